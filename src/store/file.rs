//! The `file` and `cached_file` engines: sessions in a redb database file
//! (`<path>/sessions.redb`) with a redo log in front of it
//! (`<path>/sessions.wal`). A write is durable before it is acknowledged.
//!
//! Why a log: on a virtual disk a redb commit costs an fsync of every B-tree
//! page it touched (about a dozen random 4 KiB pages for one update, two or
//! three per update in a batch), and random page writes are what such a disk
//! does worst. Appending the changed records to a log costs one sequential
//! write and one `fdatasync` per batch, whatever its size.
//!
//! Design:
//! - One writer thread owns the write side. Every `create`, `apply`,
//!   `delete` and `clear_expired` is sent to it over a channel with a oneshot
//!   for its answer. The thread drains every queued operation into ONE redb
//!   write transaction and applies them in order (an `apply` reads the
//!   newest stored record inside the transaction, patches it and writes it
//!   back: patches are atomic, concurrent disjoint patches all survive). The
//!   records the batch wrote or deleted (after-images) are appended to the
//!   log as one checksummed frame and `fdatasync`ed (group commit: one
//!   fsync per batch); only then is the transaction committed, in memory
//!   (`Durability::None`, no I/O), and the callers answered. Readers thus
//!   never see a write that is not yet durable.
//! - Checkpoint: every [`CHECKPOINT_INTERVAL`] (or [`CHECKPOINT_LOG_BYTES`]
//!   of log) the writer makes redb durable (`Durability::Immediate`,
//!   quick-repair, so opening after a crash does not walk the whole file),
//!   recording the sequence number of the last frame it contains, then
//!   empties the log.
//! - Recovery (every open): redb opens at its last durable checkpoint; the
//!   frames after it are replayed in order (after-images are idempotent), up
//!   to the first torn or out-of-sequence frame (a write that was never
//!   acknowledged); then a checkpoint. Start-up costs at most one interval of
//!   log, not the size of the store.
//! - Table `sessions`: the 32-byte key -> an encoded [`Record`] (a 34-byte
//!   header: format, expiry kind, expiry value, created, modified,
//!   expires_at; then the data bytes). Table `expiry`: (expires_at, key) ->
//!   (), kept in the same transaction as every write, so `clear_expired`
//!   scans only what has expired. A large sweep runs in chunks of
//!   [`CLEAR_CHUNK`] per batch, so writers are not held behind it.
//! - With `[session] user_key` (SPEC 9): multimap table `users`, the user's
//!   text -> the keys of the user's sessions, changed by the same code that
//!   puts and deletes records (so in the same transaction, and by the log's
//!   replay too): it never disagrees with `sessions`, and survives restart
//!   and `kill -9`. Table `users_meta` names the user key the index was
//!   built for; opening with another (or none) rebuilds (or drops) it.
//!   A revocation runs on the writer thread, in a batch like any write, so
//!   a write in flight of a revoked session finds it missing.
//! - A failed log append or commit answers its whole batch
//!   [`StoreError::Unavailable`]; nothing more is appended until the store
//!   has been reopened (recovery again), which is retried every
//!   [`REOPEN_INTERVAL`] without a restart.
//! - Reads (`load`) open a redb read transaction on the calling task: a
//!   lookup is a few microseconds when the pages are cached.
//! - `cached_file`: a map in memory in front, filled on a miss and kept up
//!   to date by the writer thread after each commit (written records are
//!   inserted, deleted ones removed). A hit costs no disk I/O. A miss reads
//!   the file and fills the map unless a commit happened meanwhile (an epoch
//!   counter, bumped after every commit before the map is updated, tells),
//!   so the map never holds a state older than the file.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use redb::{
    Database, DatabaseError, Durability, MultimapTableDefinition, ReadableDatabase,
    ReadableMultimapTable, ReadableTable, TableDefinition,
};
use tokio::sync::oneshot;

use super::memory::KeyHash;
use super::{Applied, KeyFilter, Store, StoreError, UserSession, WriteCtx};
use crate::session::key::KEY_LEN;
use crate::session::{Expiry, Patch, Record, SessionKey, Stamp};

/// The database file inside the configured directory.
pub const FILE_NAME: &str = "sessions.redb";
/// The redo log inside the configured directory.
pub const LOG_NAME: &str = "sessions.wal";

const SESSIONS: TableDefinition<&[u8; KEY_LEN], &[u8]> = TableDefinition::new("sessions");
const EXPIRY: TableDefinition<&[u8; INDEX_KEY_LEN], ()> = TableDefinition::new("expiry");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// In `META`: the sequence number of the last log frame redb holds durably.
const CHECKPOINT_SEQ: &str = "checkpoint_seq";
/// A user's text -> the keys of the user's sessions (`user_key`).
const USERS: MultimapTableDefinition<&str, &[u8; KEY_LEN]> = MultimapTableDefinition::new("users");
/// In `USERS_META` under [`USER_KEY`]: the user key `USERS` was built for.
const USERS_META: TableDefinition<&str, &str> = TableDefinition::new("users_meta");
const USER_KEY: &str = "user_key";

const INDEX_KEY_LEN: usize = 8 + KEY_LEN;
/// At most this many operations share one transaction.
const MAX_BATCH: usize = 4096;
/// At most this many expired sessions are deleted per batch.
pub const CLEAR_CHUNK: usize = 10_000;
/// After a failure, reopening is tried at most this often.
const REOPEN_INTERVAL: Duration = Duration::from_millis(500);
/// redb is made durable (and the log emptied) at least this often while
/// there are writes...
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// ...or when the log reaches this size.
pub const CHECKPOINT_LOG_BYTES: u64 = 4 << 20;

const FORMAT: u8 = 1;
const HEADER_LEN: usize = 2 + 4 * 8;

// ---------------------------------------------------------------------------
// Record encoding
// ---------------------------------------------------------------------------

fn encode(r: &Record) -> Vec<u8> {
    let (kind, value) = match r.expiry {
        Expiry::Default => (0u8, 0i64),
        Expiry::Seconds(n) => (1, n),
        Expiry::BrowserClose => (2, 0),
        Expiry::At(t) => (3, t),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + r.data.len());
    out.push(FORMAT);
    out.push(kind);
    for v in [value, r.created, r.modified, r.expires_at] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&r.data);
    out
}

fn header_int(b: &[u8], i: usize) -> i64 {
    let at = 2 + 8 * i;
    i64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn corrupt() -> StoreError {
    StoreError::Unavailable("a stored session record is corrupt".into())
}

fn decode(b: &[u8]) -> Result<Record, StoreError> {
    if b.len() < HEADER_LEN || b[0] != FORMAT {
        return Err(corrupt());
    }
    let expiry = match (b[1], header_int(b, 0)) {
        (0, _) => Expiry::Default,
        (1, n) => Expiry::Seconds(n),
        (2, _) => Expiry::BrowserClose,
        (3, t) => Expiry::At(t),
        _ => return Err(corrupt()),
    };
    Ok(Record {
        data: Bytes::copy_from_slice(&b[HEADER_LEN..]),
        expiry,
        created: header_int(b, 1),
        modified: header_int(b, 2),
        expires_at: header_int(b, 3),
        stamp: Stamp::NONE,
    })
}

/// The user an encoded record names under `user_key`.
fn user_in(b: &[u8], user_key: &str) -> Option<String> {
    b.get(HEADER_LEN..)
        .and_then(|data| super::user_of(data, user_key))
}

/// The `expires_at` of an encoded record, without decoding the rest.
fn expires_of(b: &[u8]) -> Option<i64> {
    (b.len() >= HEADER_LEN && b[0] == FORMAT).then(|| header_int(b, 3))
}

/// (expires_at, key), ordered as the pair: the sign bit flipped and big
/// endian makes byte order equal numeric order.
fn index_key(expires_at: i64, key: &[u8; KEY_LEN]) -> [u8; INDEX_KEY_LEN] {
    let mut out = [0u8; INDEX_KEY_LEN];
    out[..8].copy_from_slice(&((expires_at as u64) ^ (1 << 63)).to_be_bytes());
    out[8..].copy_from_slice(key);
    out
}

fn key_of_index(ik: &[u8; INDEX_KEY_LEN]) -> Option<SessionKey> {
    std::str::from_utf8(&ik[8..])
        .ok()
        .and_then(SessionKey::parse)
}

// ---------------------------------------------------------------------------
// The redo log
// ---------------------------------------------------------------------------
//
// A sequence of frames: magic "SGW1", seq u64, payload length u32, the
// first 8 bytes of SHA-256(seq, length, payload), payload. The payload is a
// sequence of entries: PUT key[32] len u32 record, or DEL key[32].

const LOG_MAGIC: [u8; 4] = *b"SGW1";
const FRAME_HEADER: usize = 4 + 8 + 4 + 8;
const PUT: u8 = 1;
const DEL: u8 = 2;

fn frame_checksum(seq: u64, payload: &[u8]) -> [u8; 8] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(&seq.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finish().as_ref()[..8].try_into().expect("8 bytes")
}

fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&LOG_MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_checksum(seq, payload));
    out.extend_from_slice(payload);
    out
}

/// The whole frames at the start of `buf`, up to the first torn or damaged
/// one.
fn frames(mut buf: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= FRAME_HEADER && buf[..4] == LOG_MAGIC {
        let seq = u64::from_le_bytes(buf[4..12].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes")) as usize;
        let Some(payload) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
            break;
        };
        if buf[16..24] != frame_checksum(seq, payload) {
            break;
        }
        out.push((seq, payload));
        buf = &buf[FRAME_HEADER + len..];
    }
    out
}

/// The log file (a trait so tests can make it fail).
trait LogFile: Send {
    /// Appends `frame` and makes it durable.
    fn append(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Cuts the log to `len` bytes, durably.
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
    fn read_all(&mut self) -> std::io::Result<Vec<u8>>;
}

impl LogFile for File {
    fn append(&mut self, frame: &[u8]) -> std::io::Result<()> {
        // Opened in append mode: the write lands at the end.
        self.write_all(frame)?;
        self.sync_data()
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.sync_data()
    }
    fn read_all(&mut self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.seek(SeekFrom::Start(0))?;
        self.read_to_end(&mut out)?;
        Ok(out)
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Runs `f`, turning a panic into an error: redb panics on some damaged
/// pages, and a damaged file must not take the process down.
fn no_panic<T>(dir: &Path, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!(
                "{} is damaged ({msg}); move it aside to start with an empty store",
                dir.join(FILE_NAME).display()
            ))
        }
    }
}

/// The same error again (one per waiting caller).
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Open(m) => StoreError::Open(m.clone()),
    }
}

// ---------------------------------------------------------------------------
// Opening and recovery
// ---------------------------------------------------------------------------

type Opener = Box<dyn Fn() -> Result<(Database, Box<dyn LogFile>), String> + Send + Sync>;

/// Creates the tables, replays the log frames redb does not hold durably,
/// checkpoints and empties the log. Returns the last sequence number.
fn recover(db: &Database, log: &mut dyn LogFile, user_key: Option<&str>) -> Result<u64, String> {
    let started = Instant::now();
    let (mut replayed, mut skipped, mut found) = (0u64, 0u64, 0u64);
    let bytes = log
        .read_all()
        .map_err(|e| format!("cannot read the log {LOG_NAME}: {e}"))?;
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_quick_repair(true);
    // The user index is kept through the replay if it was built for this
    // user key, else rebuilt after it.
    let indexed_for = txn
        .open_table(USERS_META)
        .and_then(|t| Ok(t.get(USER_KEY)?.map(|v| v.value().to_owned())))
        .map_err(|e| e.to_string())?;
    let index_ok = indexed_for.as_deref() == user_key;
    let (checkpoint, last) = {
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        let checkpoint = meta
            .get(CHECKPOINT_SEQ)
            .map_err(|e| e.to_string())?
            .map_or(0, |v| v.value());
        let mut t = Tables::open(&txn, user_key.filter(|_| index_ok)).map_err(|e| e.to_string())?;
        let mut last = checkpoint;
        for (seq, payload) in frames(&bytes) {
            found += 1;
            if seq <= checkpoint {
                skipped += 1;
                continue; // already in redb (the log was not emptied)
            }
            if seq != last + 1 {
                break; // a leftover of an older log
            }
            t.replay(payload).map_err(|e| e.to_string())?;
            last = seq;
            replayed += 1;
        }
        meta.insert(CHECKPOINT_SEQ, last)
            .map_err(|e| e.to_string())?;
        (checkpoint, last)
    };
    if !index_ok {
        let n = rebuild_user_index(&txn, user_key).map_err(|e| e.to_string())?;
        tracing::info!(
            user_key = user_key.unwrap_or(""),
            indexed = n,
            "session store: user index rebuilt for a changed user_key"
        );
    }
    txn.commit().map_err(|e| e.to_string())?;
    if !bytes.is_empty() {
        log.truncate(0)
            .map_err(|e| format!("cannot empty the log {LOG_NAME}: {e}"))?;
    }
    if !bytes.is_empty() {
        tracing::info!(
            checkpoint,
            replayed,
            already_in_database = skipped,
            out_of_sequence = found - skipped - replayed,
            log_bytes = bytes.len(),
            ms = started.elapsed().as_millis() as u64,
            "session log recovered"
        );
    }
    Ok(last)
}

/// Drops the user index and builds it again for `user_key` (none: dropped).
fn rebuild_user_index(
    txn: &redb::WriteTransaction,
    user_key: Option<&str>,
) -> Result<u64, redb::Error> {
    txn.delete_multimap_table(USERS)?;
    let mut meta = txn.open_table(USERS_META)?;
    let Some(user_key) = user_key else {
        meta.remove(USER_KEY)?;
        return Ok(0);
    };
    let sessions = txn.open_table(SESSIONS)?;
    let mut users = txn.open_multimap_table(USERS)?;
    let mut n = 0;
    for entry in sessions.iter()? {
        let (k, v) = entry?;
        if let Some(u) = user_in(v.value(), user_key) {
            users.insert(u.as_str(), k.value())?;
            n += 1;
        }
    }
    meta.insert(USER_KEY, user_key)?;
    Ok(n)
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

struct Shared {
    /// `None` while the writer reopens the database after a failure.
    db: RwLock<Option<Database>>,
    /// `cached_file` only.
    cache: Option<DashMap<SessionKey, Record, KeyHash>>,
    /// Bumped after every commit (and failure), before the cache is
    /// updated: a miss fills the cache only if no commit happened meanwhile.
    epoch: AtomicU64,
    /// Where the files are, for messages.
    dir: PathBuf,
    /// `[session] user_key`: the user index is kept.
    user_key: Option<String>,
}

impl Shared {
    fn read(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        self.reading(|txn| {
            let table = txn.open_table(SESSIONS)?;
            let got = table.get(key.as_bytes())?;
            Ok(got.map(|v| decode(v.value())))
        })?
        .transpose()
    }

    /// Runs `f` in a read transaction on the calling task.
    fn reading<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        let Some(db) = guard.as_ref() else {
            return Err(StoreError::Unavailable(format!(
                "{}: reopening after a write error",
                self.dir.display()
            )));
        };
        no_panic(&self.dir, || {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            f(&txn).map_err(|e| e.to_string())
        })
        .map_err(StoreError::Unavailable)
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    Create(Record, Reply<SessionKey>),
    Apply(SessionKey, Box<Patch>, WriteCtx, Reply<Applied>),
    Delete(SessionKey, Reply<()>),
    Clear(i64, Reply<u64>),
    /// End the sessions of a user but one; answers how many were live.
    Revoke {
        user: String,
        keep: Option<SessionKey>,
        now: i64,
        reply: Reply<u64>,
    },
    /// End these sessions; answers how many were live.
    RevokeKeys(Vec<SessionKey>, i64, Reply<u64>),
    /// `/readyz`: whether the log can be written now (an empty frame is
    /// appended and synced, as a write's frame would be).
    Ping(Reply<()>),
    /// Finish what is queued before it, checkpoint, stop the writer thread.
    Stop(oneshot::Sender<()>),
}

/// The file engines' store.
pub struct FileStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl FileStore {
    /// Opens (creating it and the directory if needed) the store in the
    /// directory `path`, replaying its log. `cached`: the `cached_file` engine.
    pub async fn open(path: &Path, cached: bool) -> Result<FileStore, StoreError> {
        FileStore::open_with_user_key(path, cached, None).await
    }

    /// [`FileStore::open`], keeping the index of a user's sessions under
    /// `user_key` (SPEC 9; built from the records if the store was last
    /// opened without it or with another).
    pub async fn open_with_user_key(
        path: &Path,
        cached: bool,
        user_key: Option<String>,
    ) -> Result<FileStore, StoreError> {
        let dir = path.to_path_buf();
        tokio::task::spawn_blocking(move || FileStore::open_blocking(&dir, cached, user_key))
            .await
            .map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?
    }

    fn open_blocking(
        dir: &Path,
        cached: bool,
        user_key: Option<String>,
    ) -> Result<FileStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Open(format!("cannot create directory {}: {e}", dir.display()))
        })?;
        let (db_file, log_file) = (dir.join(FILE_NAME), dir.join(LOG_NAME));
        let opener: Opener = Box::new(move || {
            let db = redb::Builder::new()
                .create(&db_file)
                .map_err(|e| db_open_error(&db_file, e))?;
            let log = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&log_file)
                .map_err(|e| format!("cannot open {}: {e}", log_file.display()))?;
            Ok((db, Box::new(log) as Box<dyn LogFile>))
        });
        let store = FileStore::with_opener(dir, opener, cached, user_key)?;
        // The files' directory entries must survive a power loss too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Open(format!("cannot sync {}: {e}", dir.display())))?;
        Ok(store)
    }

    /// Opens the database and log through `opener` (tests inject failures).
    fn with_opener(
        dir: &Path,
        opener: Opener,
        cached: bool,
        user_key: Option<String>,
    ) -> Result<FileStore, StoreError> {
        let (db, log, seq) = no_panic(dir, || {
            let (db, mut log) = opener()?;
            let seq = recover(&db, &mut *log, user_key.as_deref())
                .map_err(|e| format!("{}: recovery failed: {e}", dir.display()))?;
            Ok((db, log, seq))
        })
        .map_err(StoreError::Open)?;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(db)),
            cache: cached.then(|| DashMap::with_hasher(KeyHash)),
            epoch: AtomicU64::new(0),
            dir: dir.to_path_buf(),
            user_key,
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            shared: shared.clone(),
            opener,
            log: Some(log),
            seq,
            checkpointed: seq,
            log_len: 0,
            last_checkpoint: Instant::now(),
            clears: VecDeque::new(),
            broken: None,
            last_reopen: None,
        };
        let handle = std::thread::Builder::new()
            .name("sessiongate-file-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Open(format!("cannot start the writer thread: {e}")))?;
        Ok(FileStore {
            shared,
            tx,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Records currently held in memory (`cached_file`; 0 for `file`).
    pub fn cached_len(&self) -> usize {
        self.shared.cache.as_ref().map_or(0, DashMap::len)
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(op(reply)).map_err(|_| self.closed())?;
        rx.await.map_err(|_| self.closed())?
    }

    fn closed(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "{}: the session store is closed",
            self.shared.dir.display()
        ))
    }

    fn take_writer(&self) -> Option<JoinHandle<()>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

fn db_open_error(file: &Path, e: DatabaseError) -> String {
    let hint = match e {
        DatabaseError::DatabaseAlreadyOpen => " (is another sessiongate process using this store?)",
        _ => "",
    };
    format!("cannot open {}: {e}{hint}", file.display())
}

impl Drop for FileStore {
    fn drop(&mut self) {
        // Queued writes finish and a checkpoint is made; the database closes
        // when the last holder of `shared` (this store or the writer) goes.
        if let Some(h) = self.take_writer() {
            let (done, _) = oneshot::channel();
            let _ = self.tx.send(Op::Stop(done));
            let _ = h.join();
        }
    }
}

impl Store for FileStore {
    async fn load(&self, key: &SessionKey, now: i64) -> Result<Option<Record>, StoreError> {
        let s = &self.shared;
        let Some(cache) = &s.cache else {
            return Ok(s.read(key)?.filter(|r| r.is_live(now)));
        };
        if let Some(r) = cache.get(key) {
            return Ok(Some(r.clone()).filter(|r| r.is_live(now)));
        }
        let epoch = s.epoch.load(Ordering::SeqCst);
        let got = s.read(key)?;
        if let Some(r) = &got {
            if let Entry::Vacant(v) = cache.entry(*key) {
                // Under the entry's lock: the writer updates this entry only
                // after bumping the epoch, so an unchanged epoch means our
                // read is not older than what the cache will hold.
                if s.epoch.load(Ordering::SeqCst) == epoch {
                    v.insert(r.clone());
                }
            }
        }
        Ok(got.filter(|r| r.is_live(now)))
    }

    async fn create(&self, record: Record) -> Result<SessionKey, StoreError> {
        self.call(|r| Op::Create(record, r)).await
    }

    async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        self.call(|r| Op::Apply(*key, Box::new(patch.clone()), ctx, r))
            .await
    }

    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        self.call(|r| Op::Delete(*key, r)).await
    }

    async fn clear_expired(&self, now: i64) -> Result<u64, StoreError> {
        self.call(|r| Op::Clear(now, r)).await
    }

    async fn user_sessions(&self, user: &str, now: i64) -> Result<Vec<UserSession>, StoreError> {
        let s = &self.shared;
        let Some(user_key) = s.user_key.as_deref() else {
            return Ok(Vec::new());
        };
        let mut out = s.reading(|txn| {
            let users = txn.open_multimap_table(USERS)?;
            let sessions = txn.open_table(SESSIONS)?;
            let mut out = Vec::new();
            for k in users.get(user)? {
                let k = *k?.value();
                let Some(v) = sessions.get(&k)? else {
                    continue;
                };
                let (Ok(r), Some(key)) = (decode(v.value()), SessionKey::parse_bytes(&k)) else {
                    continue;
                };
                if r.is_live(now) && super::user_of(&r.data, user_key).as_deref() == Some(user) {
                    out.push(UserSession::of(key, &r));
                }
            }
            Ok(out)
        })?;
        out.sort_by_key(|s| (s.created, s.key));
        Ok(out)
    }

    async fn revoke_user(
        &self,
        user: &str,
        keep: Option<&SessionKey>,
        now: i64,
    ) -> Result<u64, StoreError> {
        if self.shared.user_key.is_none() {
            return Ok(0);
        }
        self.call(|reply| Op::Revoke {
            user: user.to_owned(),
            keep: keep.copied(),
            now,
            reply,
        })
        .await
    }

    async fn revoke_matching(&self, matches: KeyFilter<'_>, now: i64) -> Result<u64, StoreError> {
        let keys = self.shared.reading(|txn| {
            let sessions = txn.open_table(SESSIONS)?;
            let mut keys = Vec::new();
            for entry in sessions.iter()? {
                let (k, _) = entry?;
                if let Some(key) = SessionKey::parse_bytes(k.value()) {
                    if matches(&key) {
                        keys.push(key);
                    }
                }
            }
            Ok(keys)
        })?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.call(|r| Op::RevokeKeys(keys, now, r)).await
    }

    /// Ready when the writer can append to the log now: not broken (a
    /// failed write is retried by reopening), and an empty frame is
    /// appended and synced. A full disk fails it, as it fails every write.
    async fn ping(&self) -> Result<(), StoreError> {
        self.call(Op::Ping).await
    }

    /// Every write is durable when acknowledged; this waits for the queued
    /// ones, checkpoints (the log is left empty) and stops the writer
    /// thread. Later writes fail as Unavailable; reads still work.
    async fn flush(&self) -> Result<(), StoreError> {
        let Some(handle) = self.take_writer() else {
            return Ok(());
        };
        let (done, rx) = oneshot::channel();
        if self.tx.send(Op::Stop(done)).is_ok() {
            let _ = rx.await;
        }
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(unavailable)?
            .map_err(|_| StoreError::Unavailable("the session writer thread panicked".into()))
    }
}

// ---------------------------------------------------------------------------
// The writer thread
// ---------------------------------------------------------------------------

/// What an operation answers once its batch is durable.
enum Outcome {
    Key(Reply<SessionKey>, Result<SessionKey, StoreError>),
    Applied(Reply<Applied>, Result<Applied, StoreError>),
    Done(Reply<()>),
    Count(Reply<u64>, u64),
}

impl Outcome {
    fn send(self) {
        match self {
            Outcome::Key(r, v) => drop(r.send(v)),
            Outcome::Applied(r, v) => drop(r.send(v)),
            Outcome::Done(r) => drop(r.send(Ok(()))),
            Outcome::Count(r, n) => drop(r.send(Ok(n))),
        }
    }
    fn fail(self, e: &StoreError) {
        match self {
            Outcome::Key(r, _) => drop(r.send(Err(again(e)))),
            Outcome::Applied(r, _) => drop(r.send(Err(again(e)))),
            Outcome::Done(r) => drop(r.send(Err(again(e)))),
            Outcome::Count(r, _) => drop(r.send(Err(again(e)))),
        }
    }
}

fn fail_op(op: Op, e: &StoreError) {
    match op {
        Op::Create(_, r) => drop(r.send(Err(again(e)))),
        Op::Apply(_, _, _, r) => drop(r.send(Err(again(e)))),
        Op::Delete(_, r) => drop(r.send(Err(again(e)))),
        Op::Clear(_, r) => drop(r.send(Err(again(e)))),
        Op::Revoke { reply, .. } => drop(reply.send(Err(again(e)))),
        Op::RevokeKeys(_, _, r) => drop(r.send(Err(again(e)))),
        Op::Ping(r) => drop(r.send(Err(again(e)))),
        Op::Stop(s) => drop(s.send(())),
    }
}

struct PendingClear {
    now: i64,
    removed: u64,
    reply: Reply<u64>,
}

/// Changes made by one batch, for the cache.
type CacheUpdates = Vec<(SessionKey, Option<Record>)>;

struct Writer {
    shared: Arc<Shared>,
    opener: Opener,
    /// `None` while broken and not yet reopened.
    log: Option<Box<dyn LogFile>>,
    /// The last frame appended.
    seq: u64,
    /// The last frame redb holds durably.
    checkpointed: u64,
    log_len: u64,
    last_checkpoint: Instant,
    clears: VecDeque<PendingClear>,
    /// Set by a failure: nothing is appended until the store is reopened.
    broken: Option<String>,
    last_reopen: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut stop: Option<oneshot::Sender<()>> = None;
        let mut disconnected = false;
        loop {
            let mut ops = Vec::new();
            if self.clears.is_empty() && stop.is_none() && !disconnected {
                // Wake up for a due checkpoint or reopen even without writes.
                let wait = if self.broken.is_some() {
                    Some(REOPEN_INTERVAL)
                } else if self.seq > self.checkpointed {
                    Some(CHECKPOINT_INTERVAL.saturating_sub(self.last_checkpoint.elapsed()))
                } else {
                    None
                };
                let first = match wait {
                    Some(w) => match rx.recv_timeout(w) {
                        Ok(op) => Some(op),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            disconnected = true;
                            None
                        }
                    },
                    None => match rx.recv() {
                        Ok(op) => Some(op),
                        Err(_) => {
                            disconnected = true;
                            None
                        }
                    },
                };
                ops.extend(first);
            }
            while stop.is_none()
                && !disconnected
                && ops.len() < MAX_BATCH
                && !matches!(ops.last(), Some(Op::Stop(_)))
            {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => disconnected = true,
                }
            }
            if let Some(Op::Stop(_)) = ops.last() {
                if let Some(Op::Stop(s)) = ops.pop() {
                    stop = Some(s);
                }
            }
            if self.broken.is_some() {
                let _ = self.reopen();
            }
            if !ops.is_empty() || !self.clears.is_empty() {
                self.batch(ops);
            }
            if self.broken.is_none()
                && self.seq > self.checkpointed
                && (self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
                    || self.log_len >= CHECKPOINT_LOG_BYTES)
            {
                self.checkpoint();
            }
            if (stop.is_some() || disconnected) && self.clears.is_empty() {
                break;
            }
        }
        if self.broken.is_none() && self.seq > self.checkpointed {
            self.checkpoint();
        }
        // Anything still queued is answered with an error as `rx` drops.
        drop(rx);
        if let Some(s) = stop {
            let _ = s.send(());
        }
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) -> String {
        format!("{}: {what}: {e}", self.shared.dir.display())
    }

    /// Runs `ops` (and a chunk of the oldest pending sweep) in one
    /// transaction, logs and commits it, updates the cache, answers.
    fn batch(&mut self, ops: Vec<Op>) {
        let mut pings = Vec::new();
        let ops: Vec<Op> = ops
            .into_iter()
            .filter_map(|op| match op {
                Op::Ping(r) => {
                    pings.push(r);
                    None
                }
                op => Some(op),
            })
            .collect();
        if !ops.is_empty() || !self.clears.is_empty() {
            self.write_batch(ops);
        }
        if !pings.is_empty() {
            let result = self.probe();
            for r in pings {
                let _ = r.send(result.as_ref().map(|_| ()).map_err(again));
            }
        }
    }

    /// A ping's answer: the writer is not broken, and an empty frame (a
    /// batch that changes nothing, replayed as such) reaches the log.
    fn probe(&mut self) -> Result<(), StoreError> {
        if let Some(cause) = &self.broken {
            return Err(StoreError::Unavailable(cause.clone()));
        }
        let f = frame(self.seq + 1, &[]);
        let log = self.log.as_mut().expect("not broken");
        match log.append(&f) {
            Ok(()) => {
                self.seq += 1;
                self.log_len += f.len() as u64;
                Ok(())
            }
            Err(e) => {
                let msg = self.error("cannot write the log", e);
                tracing::error!(error = %msg, "session store ping failed; reopening");
                // The log may end in a torn frame: recovery deals with it.
                self.broken = Some(msg.clone());
                Err(StoreError::Unavailable(msg))
            }
        }
    }

    fn write_batch(&mut self, ops: Vec<Op>) {
        let mut pending = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Clear(now, reply) => self.clears.push_back(PendingClear {
                    now,
                    removed: 0,
                    reply,
                }),
                other => pending.push(other),
            }
        }
        if let Some(cause) = &self.broken {
            let e = StoreError::Unavailable(cause.clone());
            for op in pending {
                fail_op(op, &e);
            }
            for c in self.clears.drain(..) {
                let _ = c.reply.send(Err(again(&e)));
            }
            return;
        }
        let mut outcomes = Vec::with_capacity(pending.len());
        let mut updates: CacheUpdates = Vec::new();
        let mut clear_done = false;
        let shared = self.shared.clone();
        let result = {
            let guard = shared.db.read().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(db) => no_panic(&shared.dir, || {
                    self.transaction(db, pending, &mut outcomes, &mut updates, &mut clear_done)
                }),
                None => Err(self.error("write failed", "the database is closed")),
            }
        };
        match result {
            Ok(()) => {
                self.publish(updates);
                for o in outcomes {
                    o.send();
                }
                if clear_done {
                    if let Some(c) = self.clears.pop_front() {
                        let _ = c.reply.send(Ok(c.removed));
                    }
                }
            }
            Err(msg) => {
                tracing::error!(error = %msg, "session store write failed; reopening");
                self.broken = Some(msg.clone());
                let err = StoreError::Unavailable(msg);
                // The outcome is unknown: forget what the cache knew about
                // the keys involved.
                self.shared.epoch.fetch_add(1, Ordering::SeqCst);
                if let Some(cache) = &self.shared.cache {
                    for (k, _) in &updates {
                        cache.remove(k);
                    }
                }
                for o in outcomes {
                    o.fail(&err);
                }
                for c in self.clears.drain(..) {
                    let _ = c.reply.send(Err(again(&err)));
                }
            }
        }
    }

    fn publish(&self, updates: CacheUpdates) {
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(cache) = &self.shared.cache {
            for (k, r) in updates {
                match r {
                    Some(r) => {
                        cache.insert(k, r);
                    }
                    None => {
                        cache.remove(&k);
                    }
                }
            }
        }
    }

    /// The transaction of one batch: applied, logged durably, committed in
    /// memory. On `Err` nothing is answered yet and nothing was committed.
    fn transaction(
        &mut self,
        db: &Database,
        ops: Vec<Op>,
        outcomes: &mut Vec<Outcome>,
        updates: &mut CacheUpdates,
        clear_done: &mut bool,
    ) -> Result<(), String> {
        let dir = self.shared.dir.clone();
        let werr = |e: redb::Error| format!("{}: write failed: {e}", dir.display());
        let mut txn = db.begin_write().map_err(|e| werr(e.into()))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.error("write failed", e))?;
        let payload = {
            let mut t = Tables::open(&txn, self.shared.user_key.as_deref()).map_err(werr)?;
            for op in ops {
                outcomes.push(t.run(op, updates).map_err(werr)?);
            }
            if let Some(c) = self.clears.front_mut() {
                let (n, finished) = t.clear_chunk(c.now, updates).map_err(werr)?;
                c.removed += n;
                *clear_done = finished;
            }
            t.log
        };
        if payload.is_empty() {
            // Nothing changed (only Unchanged/Missing answers).
            return txn.abort().map_err(|e| self.error("write failed", e));
        }
        let f = frame(self.seq + 1, &payload);
        let log = self.log.as_mut().expect("not broken");
        if let Err(e) = log.append(&f) {
            let _ = txn.abort();
            // The log may now end in a torn frame: nothing more is appended
            // until recovery has dealt with it.
            return Err(self.error("cannot write the log", e));
        }
        self.seq += 1;
        self.log_len += f.len() as u64;
        // The frame is durable: the batch happened. A failure here is
        // healed by the replay when the store is reopened.
        txn.commit().map_err(|e| self.error("commit failed", e))
    }

    /// Makes redb durable up to the last frame, then empties the log.
    fn checkpoint(&mut self) {
        let shared = self.shared.clone();
        let result = no_panic(&shared.dir, || {
            let guard = shared.db.read().unwrap_or_else(|e| e.into_inner());
            let db = guard.as_ref().ok_or("the database is closed")?;
            let mut txn = db.begin_write().map_err(|e| e.to_string())?;
            txn.set_quick_repair(true);
            txn.open_table(META)
                .map_err(|e| e.to_string())?
                .insert(CHECKPOINT_SEQ, self.seq)
                .map_err(|e| e.to_string())?;
            txn.commit().map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => {
                self.checkpointed = self.seq;
                self.last_checkpoint = Instant::now();
                let log = self.log.as_mut().expect("not broken");
                match log.truncate(0) {
                    Ok(()) => self.log_len = 0,
                    // Harmless: the frames are skipped at replay; retried
                    // at the next checkpoint.
                    Err(e) => tracing::warn!(error = %e, "cannot empty the session log"),
                }
            }
            Err(e) => {
                let msg = self.error("checkpoint failed", e);
                tracing::error!(error = %msg, "session store checkpoint failed; reopening");
                self.broken = Some(msg);
            }
        }
    }

    /// After a failure: closes and reopens the database and the log, which
    /// replays the log (redb refuses writes after a failed commit until
    /// then). Tried at most every [`REOPEN_INTERVAL`].
    fn reopen(&mut self) -> Result<(), ()> {
        let Some(cause) = self.broken.clone() else {
            return Ok(());
        };
        if self
            .last_reopen
            .is_some_and(|t| t.elapsed() < REOPEN_INTERVAL)
        {
            return Err(());
        }
        self.last_reopen = Some(Instant::now());
        let old = self
            .shared
            .db
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(old);
        self.log = None;
        let dir = self.shared.dir.clone();
        let opened = no_panic(&dir, || {
            let (db, mut log) = (self.opener)()?;
            let seq = recover(&db, &mut *log, self.shared.user_key.as_deref())?;
            Ok((db, log, seq))
        });
        match opened {
            Ok((db, log, seq)) => {
                *self.shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db);
                // Whatever the failure left, the file is now the truth.
                self.shared.epoch.fetch_add(1, Ordering::SeqCst);
                if let Some(cache) = &self.shared.cache {
                    cache.clear();
                }
                self.log = Some(log);
                self.seq = seq;
                self.checkpointed = seq;
                self.log_len = 0;
                self.last_checkpoint = Instant::now();
                self.broken = None;
                tracing::info!(dir = %self.shared.dir.display(), "session store reopened");
                Ok(())
            }
            Err(e) => {
                let first = cause.split("; reopening failed").next().unwrap_or(&cause);
                self.broken = Some(format!("{first}; reopening failed: {e}"));
                Err(())
            }
        }
    }
}

/// The tables inside a write transaction, and the log payload of what
/// was changed through them.
struct Tables<'t> {
    sessions: redb::Table<'t, &'static [u8; KEY_LEN], &'static [u8]>,
    expiry: redb::Table<'t, &'static [u8; INDEX_KEY_LEN], ()>,
    /// With a user key: the user index, and the key.
    users: Option<(
        redb::MultimapTable<'t, &'static str, &'static [u8; KEY_LEN]>,
        &'t str,
    )>,
    log: Vec<u8>,
}

impl<'t> Tables<'t> {
    fn open(
        txn: &'t redb::WriteTransaction,
        user_key: Option<&'t str>,
    ) -> Result<Tables<'t>, redb::Error> {
        Ok(Tables {
            sessions: txn.open_table(SESSIONS)?,
            expiry: txn.open_table(EXPIRY)?,
            users: match user_key {
                Some(k) => Some((txn.open_multimap_table(USERS)?, k)),
                None => None,
            },
            log: Vec::new(),
        })
    }

    /// Moves `key` in the user index from the user `old` names to the one
    /// `new` names (encoded records; `None`: absent).
    fn relink(
        &mut self,
        key: &[u8; KEY_LEN],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), redb::Error> {
        let Some((users, user_key)) = &mut self.users else {
            return Ok(());
        };
        let old = old.and_then(|b| user_in(b, user_key));
        let new = new.and_then(|b| user_in(b, user_key));
        if old != new {
            if let Some(o) = old {
                users.remove(o.as_str(), key)?;
            }
            if let Some(n) = new {
                users.insert(n.as_str(), key)?;
            }
        }
        Ok(())
    }

    fn get(&self, key: &SessionKey) -> Result<Option<Result<Record, StoreError>>, redb::Error> {
        Ok(self
            .sessions
            .get(key.as_bytes())?
            .map(|v| decode(v.value())))
    }

    /// Stores encoded `bytes` under `key`, moving its index entries (the
    /// user index's only when `same_user` is false).
    fn put_bytes(
        &mut self,
        key: &[u8; KEY_LEN],
        bytes: &[u8],
        same_user: bool,
    ) -> Result<(), redb::Error> {
        let new = expires_of(bytes);
        let relink = self.users.is_some() && !same_user;
        let (old, old_bytes) = match self.sessions.insert(key, bytes)? {
            Some(v) => (expires_of(v.value()), relink.then(|| v.value().to_vec())),
            None => (None, None),
        };
        if relink {
            self.relink(key, old_bytes.as_deref(), Some(bytes))?;
        }
        if old != new {
            if let Some(o) = old {
                self.expiry.remove(&index_key(o, key))?;
            }
            if let Some(n) = new {
                self.expiry.insert(&index_key(n, key), ())?;
            }
        }
        Ok(())
    }

    /// Removes `key` and its index entry; whether it was there.
    fn del_bytes(&mut self, key: &[u8; KEY_LEN]) -> Result<bool, redb::Error> {
        self.del_bytes_of(key, None)
    }

    /// [`Tables::del_bytes`]; `user`: the user the record names, when the
    /// caller knows it (a revocation), so the record need not be parsed.
    fn del_bytes_of(
        &mut self,
        key: &[u8; KEY_LEN],
        user: Option<&str>,
    ) -> Result<bool, redb::Error> {
        let (old, old_bytes) = match self.sessions.remove(key)? {
            None => return Ok(false),
            Some(v) => (
                expires_of(v.value()),
                (self.users.is_some() && user.is_none()).then(|| v.value().to_vec()),
            ),
        };
        match (user, &mut self.users) {
            (Some(u), Some((users, _))) => {
                users.remove(u, key)?;
            }
            _ => {
                if old_bytes.is_some() {
                    self.relink(key, old_bytes.as_deref(), None)?;
                }
            }
        }
        if let Some(o) = old {
            self.expiry.remove(&index_key(o, key))?;
        }
        Ok(true)
    }

    fn put(&mut self, key: &SessionKey, r: &Record, same_user: bool) -> Result<(), redb::Error> {
        let bytes = encode(r);
        self.put_bytes(key.as_bytes(), &bytes, same_user)?;
        self.log.push(PUT);
        self.log.extend_from_slice(key.as_bytes());
        self.log
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.log.extend_from_slice(&bytes);
        Ok(())
    }

    fn del(&mut self, key: &SessionKey) -> Result<bool, redb::Error> {
        self.del_of(key, None)
    }

    fn del_of(&mut self, key: &SessionKey, user: Option<&str>) -> Result<bool, redb::Error> {
        let removed = self.del_bytes_of(key.as_bytes(), user)?;
        if removed {
            self.log.push(DEL);
            self.log.extend_from_slice(key.as_bytes());
        }
        Ok(removed)
    }

    /// Applies one log frame's entries (recovery).
    fn replay(&mut self, mut p: &[u8]) -> Result<(), String> {
        let bad = || "a log frame is malformed".to_string();
        while let Some((&tag, rest)) = p.split_first() {
            let key: &[u8; KEY_LEN] = rest
                .get(..KEY_LEN)
                .and_then(|k| k.try_into().ok())
                .ok_or_else(bad)?;
            let rest = &rest[KEY_LEN..];
            match tag {
                PUT => {
                    let len = rest
                        .get(..4)
                        .map(|l| u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize)
                        .ok_or_else(bad)?;
                    let bytes = rest.get(4..4 + len).ok_or_else(bad)?;
                    self.put_bytes(key, bytes, false)
                        .map_err(|e| e.to_string())?;
                    p = &rest[4 + len..];
                }
                DEL => {
                    self.del_bytes(key).map_err(|e| e.to_string())?;
                    p = rest;
                }
                _ => return Err(bad()),
            }
        }
        Ok(())
    }

    fn fresh_key(&self) -> Result<SessionKey, redb::Error> {
        loop {
            let k = SessionKey::generate();
            if self.sessions.get(k.as_bytes())?.is_none() {
                return Ok(k);
            }
        }
    }

    fn run(&mut self, op: Op, updates: &mut CacheUpdates) -> Result<Outcome, redb::Error> {
        Ok(match op {
            Op::Create(record, reply) => {
                let key = self.fresh_key()?;
                self.put(&key, &record, false)?;
                updates.push((key, Some(record)));
                Outcome::Key(reply, Ok(key))
            }
            Op::Delete(key, reply) => {
                if self.del(&key)? {
                    updates.push((key, None));
                }
                Outcome::Done(reply)
            }
            Op::Apply(key, patch, ctx, reply) => {
                let result = self.apply(&key, &patch, ctx, updates)?;
                Outcome::Applied(reply, result)
            }
            Op::Revoke {
                user,
                keep,
                now,
                reply,
            } => {
                let n = self.revoke(&user, keep.as_ref(), now, updates)?;
                Outcome::Count(reply, n)
            }
            Op::RevokeKeys(keys, now, reply) => {
                let mut n = 0;
                for key in keys {
                    n += self.end(&key, None, now, updates)?;
                }
                Outcome::Count(reply, n)
            }
            Op::Clear(..) | Op::Ping(_) | Op::Stop(_) => unreachable!("handled by the batch"),
        })
    }

    fn apply(
        &mut self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
        updates: &mut CacheUpdates,
    ) -> Result<Result<Applied, StoreError>, redb::Error> {
        let mut record = match self.get(key)? {
            None => return Ok(Ok(Applied::Missing)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) if !r.is_live(ctx.now) => return Ok(Ok(Applied::Missing)),
            Some(Ok(r)) => r,
        };
        let before = record.clone();
        if patch.cycle {
            record.apply_patch(patch, ctx.now, &ctx.policy);
            if let Some(size) = ctx.too_large(&before, &record) {
                return Ok(Ok(Applied::TooLarge { size }));
            }
            // The old key goes in the same transaction as the new one comes.
            self.del(key)?;
            updates.push((*key, None));
            let new_key = self.fresh_key()?;
            self.put(&new_key, &record, false)?;
            updates.push((new_key, Some(record.clone())));
            return Ok(Ok(Applied::Saved {
                key: new_key,
                record,
            }));
        }
        if !record.apply_patch(patch, ctx.now, &ctx.policy) && !ctx.touches(&before) {
            return Ok(Ok(Applied::Unchanged));
        }
        if let Some(size) = ctx.too_large(&before, &record) {
            return Ok(Ok(Applied::TooLarge { size }));
        }
        let same_user = self
            .users
            .as_ref()
            .is_none_or(|(_, k)| !super::touches_user(patch, k));
        self.put(key, &record, same_user)?;
        updates.push((*key, Some(record.clone())));
        Ok(Ok(Applied::Saved { key: *key, record }))
    }

    /// Deletes the session `key` (of `user`, when known); 1 if it was
    /// live, else 0.
    fn end(
        &mut self,
        key: &SessionKey,
        user: Option<&str>,
        now: i64,
        updates: &mut CacheUpdates,
    ) -> Result<u64, redb::Error> {
        let live = match self.sessions.get(key.as_bytes())? {
            None => return Ok(0),
            // An unreadable record goes too, uncounted.
            Some(v) => expires_of(v.value()).is_some_and(|e| e > now),
        };
        self.del_of(key, user)?;
        updates.push((*key, None));
        Ok(u64::from(live))
    }

    /// Deletes every session of `user` but `keep`; how many were live.
    fn revoke(
        &mut self,
        user: &str,
        keep: Option<&SessionKey>,
        now: i64,
        updates: &mut CacheUpdates,
    ) -> Result<u64, redb::Error> {
        let Some((users, _)) = &self.users else {
            return Ok(0);
        };
        let mut keys = Vec::new();
        for k in users.get(user)? {
            keys.push(*k?.value());
        }
        let mut n = 0;
        for k in keys {
            match SessionKey::parse_bytes(&k) {
                Some(key) if Some(&key) != keep => n += self.end(&key, Some(user), now, updates)?,
                Some(_) => {}
                // Never written so; dropped if found.
                None => {
                    if let Some((users, _)) = &mut self.users {
                        users.remove(user, &k)?;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Deletes up to [`CLEAR_CHUNK`] expired sessions; returns how many and
    /// whether that was all of them.
    fn clear_chunk(
        &mut self,
        now: i64,
        updates: &mut CacheUpdates,
    ) -> Result<(u64, bool), redb::Error> {
        let upper = index_key(now, &[u8::MAX; KEY_LEN]);
        let mut found = Vec::new();
        for entry in self.expiry.range::<&[u8; INDEX_KEY_LEN]>(..=&upper)? {
            let (k, _) = entry?;
            found.push(*k.value());
            if found.len() == CLEAR_CHUNK {
                break;
            }
        }
        let finished = found.len() < CLEAR_CHUNK;
        let mut removed = 0;
        for ik in found {
            // Entries move with every write, so the record behind one is
            // expired; whatever else is found (nothing should be) goes too.
            self.expiry.remove(&ik)?;
            let Some(key) = key_of_index(&ik) else {
                continue;
            };
            let expired = match self.get(&key)? {
                Some(Ok(r)) => !r.is_live(now),
                // Unreadable records go too: they can never be served.
                Some(Err(_)) => true,
                None => false,
            };
            if expired {
                self.del(&key)?;
                updates.push((key, None));
                removed += 1;
            }
        }
        Ok((removed, finished))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{set as update, T0};
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sessiongate-file-unit-{name}-{}-{}",
            std::process::id(),
            SessionKey::generate().as_str()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn frame_checksums_are_the_first_bytes_of_sha256() {
        // Python: hashlib.sha256(struct.pack("<QI", 7, 5) + b"hello")
        // .hexdigest()[:16]: logs written before the move to ring still read.
        assert_eq!(
            frame_checksum(7, b"hello"),
            [0x33, 0x2d, 0x64, 0xa8, 0x7d, 0x54, 0x31, 0x65]
        );
    }

    fn ctx() -> WriteCtx {
        super::super::test_support::ctx(T0)
    }

    fn record() -> Record {
        super::super::test_support::record(T0, "a", 1)
    }

    #[test]
    fn encoding_round_trips() {
        for expiry in [
            Expiry::Default,
            Expiry::Seconds(77),
            Expiry::BrowserClose,
            Expiry::At(-5),
        ] {
            let r = Record {
                data: Bytes::from_static(b"{\"x\":[1,2]}"),
                expiry,
                created: -1,
                modified: i64::MAX,
                expires_at: i64::MIN,
                stamp: Stamp::NONE,
            };
            assert_eq!(decode(&encode(&r)).unwrap(), r);
        }
        assert!(decode(b"short").is_err());
    }

    #[test]
    fn index_keys_order_numerically() {
        let k = [b'a'; KEY_LEN];
        let mut v = [-5i64, i64::MIN, 0, 7, i64::MAX, -1]
            .map(|t| (index_key(t, &k), t))
            .to_vec();
        v.sort();
        let order: Vec<i64> = v.iter().map(|x| x.1).collect();
        assert_eq!(order, vec![i64::MIN, -5, -1, 0, 7, i64::MAX]);
    }

    /// A file whose writes and syncs fail while `fail` is set (disk full).
    #[derive(Debug)]
    struct Flaky {
        inner: redb::backends::FileBackend,
        fail: Arc<AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.inner.close()
        }
        fn try_lock_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_shared_range(s, e)
        }
        fn lock_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_range(s, e)
        }
        fn lock_shared_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_shared_range(s, e)
        }
        fn unlock_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.unlock_range(s, e)
        }
        fn query_lock_range(
            &self,
            s: std::ops::Bound<u64>,
            e: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.query_lock_range(s, e)
        }
    }

    /// The log, failing like the database file.
    struct FlakyLog {
        file: File,
        fail: Arc<AtomicBool>,
    }

    impl LogFile for FlakyLog {
        fn append(&mut self, frame: &[u8]) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            self.file.append(frame)
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            LogFile::truncate(&mut self.file, len)
        }
        fn read_all(&mut self) -> std::io::Result<Vec<u8>> {
            self.file.read_all()
        }
    }

    fn flaky_store(cached: bool) -> (FileStore, Arc<AtomicBool>, PathBuf) {
        let dir = tmp("flaky");
        let fail = Arc::new(AtomicBool::new(false));
        let (f, d) = (fail.clone(), dir.clone());
        let opener: Opener = Box::new(move || {
            let open = |name: &str, append: bool| {
                OpenOptions::new()
                    .read(true)
                    .write(!append)
                    .append(append)
                    .create(true)
                    .truncate(false)
                    .open(d.join(name))
                    .map_err(|e| e.to_string())
            };
            let db = redb::Builder::new()
                .create_with_backend(Flaky {
                    inner: redb::backends::FileBackend::new(open(FILE_NAME, false)?)
                        .map_err(|e| e.to_string())?,
                    fail: f.clone(),
                })
                .map_err(|e| e.to_string())?;
            let log = FlakyLog {
                file: open(LOG_NAME, true)?,
                fail: f.clone(),
            };
            Ok((db, Box::new(log) as Box<dyn LogFile>))
        });
        let s = FileStore::with_opener(&dir, opener, cached, None).unwrap();
        (s, fail, dir)
    }

    async fn disk_failure_is_unavailable_then_recovers(cached: bool) {
        let (s, fail, dir) = flaky_store(cached);
        let k = s.create(record()).await.unwrap();
        s.ping().await.expect("ready while the disk takes writes");
        fail.store(true, Ordering::SeqCst);
        // `/readyz` sees a full disk before any write does...
        let e = s.ping().await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("cannot write the log"), "{e}");
        let e = s.create(record()).await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains(dir.to_str().unwrap()), "{e}");
        let e = s.apply(&k, &update("b", 2), ctx()).await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        // The acknowledged write is still there; the failed one is not
        // reported as done.
        fail.store(false, Ordering::SeqCst);
        // Reads come back once the writer has reopened the file.
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            match s.load(&k, T0).await {
                Ok(got) => break got.expect("acknowledged write kept"),
                Err(e) if Instant::now() < deadline => {
                    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("not recovered: {e}"),
            }
        };
        assert_eq!(&got.data[..], b"{\"a\":1}");
        // Writes work again without a restart (after at most one
        // REOPEN_INTERVAL of failing fast).
        let applied = loop {
            match s.apply(&k, &update("c", 3), ctx()).await {
                Ok(a) => break a,
                Err(e) if Instant::now() < deadline => {
                    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("not recovered: {e}"),
            }
        };
        assert!(matches!(applied, Applied::Saved { .. }), "{applied:?}");
        // ...and ready again once writes work, the empty frames its pings
        // appended replayed as nothing.
        s.ping().await.expect("ready again");
        let got = s.load(&k, T0).await.unwrap().unwrap();
        assert!(got.data.starts_with(b"{\"a\":1"), "{:?}", got.data);
        assert!(got.data.ends_with(b"\"c\":3}"), "{:?}", got.data);
        s.flush().await.unwrap();
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_failure_file() {
        disk_failure_is_unavailable_then_recovers(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_failure_cached_file() {
        disk_failure_is_unavailable_then_recovers(true).await;
    }

    #[test]
    fn torn_and_damaged_frames_end_the_log() {
        let mut log = frame(1, b"one");
        log.extend(frame(2, b"two"));
        let whole = log.len();
        log.extend(frame(3, b"three"));
        assert_eq!(frames(&log).len(), 3);
        assert_eq!(frames(&log[..log.len() - 1]).len(), 2, "torn tail");
        log[whole + FRAME_HEADER] ^= 1;
        assert_eq!(frames(&log).len(), 2, "damaged payload");
        assert!(frames(b"").is_empty());
        assert!(frames(b"garbage that is long enough to be a header").is_empty());
    }

    fn put_entry(key: &SessionKey, r: &Record) -> Vec<u8> {
        let bytes = encode(r);
        let mut e = vec![PUT];
        e.extend_from_slice(key.as_bytes());
        e.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        e.extend_from_slice(&bytes);
        e
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_replays_the_frames_after_the_checkpoint_in_order() {
        let dir = tmp("replay");
        let kept = {
            let s = FileStore::open(&dir, false).await.unwrap();
            let k = s.create(record()).await.unwrap(); // frame 1
            s.flush().await.unwrap(); // checkpoint at 1, log emptied
            k
        };
        let log_path = dir.join(LOG_NAME);
        assert_eq!(std::fs::metadata(&log_path).unwrap().len(), 0);
        let (stale, fresh, after_gap) = (
            SessionKey::generate(),
            SessionKey::generate(),
            SessionKey::generate(),
        );
        let mut r2 = record();
        r2.data = Bytes::from_static(b"{\"fresh\":1}");
        r2.expires_at = T0 + 7;
        let mut del = vec![DEL];
        del.extend_from_slice(kept.as_bytes());
        let mut log = frame(1, &put_entry(&stale, &record())); // already in redb: skipped
        log.extend(frame(2, &[put_entry(&fresh, &record()), del].concat()));
        log.extend(frame(3, &put_entry(&fresh, &r2)));
        log.extend(frame(5, &put_entry(&after_gap, &record()))); // out of sequence
        let torn = frame(6, &put_entry(&after_gap, &record()));
        log.extend(&torn[..torn.len() - 3]);
        std::fs::write(&log_path, &log).unwrap();

        let s = FileStore::open(&dir, false).await.unwrap();
        assert!(s.load(&stale, T0).await.unwrap().is_none());
        assert!(
            s.load(&kept, T0).await.unwrap().is_none(),
            "deleted by frame 2"
        );
        let got = s.load(&fresh, T0).await.unwrap().expect("frame 2 and 3");
        assert_eq!(&got.data[..], b"{\"fresh\":1}");
        assert!(s.load(&after_gap, T0).await.unwrap().is_none());
        assert_eq!(std::fs::metadata(&log_path).unwrap().len(), 0, "emptied");
        // The index followed the replayed records: only `fresh` (T0 + 7).
        assert_eq!(s.clear_expired(T0 + 7).await.unwrap(), 1);
        // New frames continue after the replayed ones.
        let k = s.create(record()).await.unwrap();
        drop(s);
        let s = FileStore::open(&dir, false).await.unwrap();
        assert!(s.load(&k, T0).await.unwrap().is_some());
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A ping's empty frame between two writes, as a crash leaves the log:
    /// the replay goes on past it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pings_empty_frame_is_replayed_as_nothing() {
        let dir = tmp("ping-frame");
        let (a, b) = (SessionKey::generate(), SessionKey::generate());
        {
            let s = FileStore::open(&dir, false).await.unwrap();
            s.flush().await.unwrap();
        }
        let mut log = frame(1, &put_entry(&a, &record()));
        log.extend(frame(2, &[]));
        log.extend(frame(3, &put_entry(&b, &record())));
        std::fs::write(dir.join(LOG_NAME), &log).unwrap();
        let s = FileStore::open(&dir, false).await.unwrap();
        assert!(s.load(&a, T0).await.unwrap().is_some());
        assert!(
            s.load(&b, T0).await.unwrap().is_some(),
            "past the empty frame"
        );
        s.ping().await.unwrap();
        let c = s.create(record()).await.unwrap();
        drop(s);
        let s = FileStore::open(&dir, false).await.unwrap();
        assert!(s.load(&c, T0).await.unwrap().is_some());
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_after_flush_fail_cleanly() {
        let dir = tmp("flush");
        let s = FileStore::open(&dir, false).await.unwrap();
        let k = s.create(record()).await.unwrap();
        s.flush().await.unwrap();
        s.flush().await.unwrap();
        assert!(matches!(
            s.create(record()).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(s.load(&k, T0).await.unwrap().is_some(), "reads still work");
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn user_record(user: Value) -> Record {
        let mut r = Record::new_at(T0);
        r.apply_patch(&update("uid", user), T0, &ctx().policy);
        r
    }

    async fn keys_of(s: &FileStore, user: &str) -> Vec<SessionKey> {
        let mut k: Vec<_> = s
            .user_sessions(user, T0)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.key)
            .collect();
        k.sort();
        k
    }

    fn sorted(mut k: Vec<SessionKey>) -> Vec<SessionKey> {
        k.sort();
        k
    }

    use serde_json::{json, Value};

    /// The user index follows creation, re-login, Cycle-Key, delete and
    /// revocation, survives a reopen, a replay of the log after a crash
    /// (frames redb does not hold), and is rebuilt when the user key changes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_user_index_follows_writes_and_survives_reopen_and_replay() {
        for cached in [false, true] {
            let dir = tmp("users");
            let uid = || Some("uid".to_string());
            let s = FileStore::open_with_user_key(&dir, cached, uid())
                .await
                .unwrap();
            let a = s.create(user_record(json!("alice"))).await.unwrap();
            let b = s.create(user_record(json!(7))).await.unwrap();
            let c = s.create(user_record(json!("7"))).await.unwrap();
            assert_eq!(keys_of(&s, "alice").await, vec![a]);
            assert_eq!(keys_of(&s, "7").await, sorted(vec![b, c]));
            // b logs in as alice; then Cycle-Key moves a.
            s.apply(&b, &update("uid", "alice"), ctx()).await.unwrap();
            let mut cycle = update("n", 1);
            cycle.cycle = true;
            let Applied::Saved { key: a2, .. } = s.apply(&a, &cycle, ctx()).await.unwrap() else {
                panic!()
            };
            assert_eq!(keys_of(&s, "alice").await, sorted(vec![a2, b]));
            assert_eq!(keys_of(&s, "7").await, vec![c]);
            drop(s);
            let s = FileStore::open_with_user_key(&dir, cached, uid())
                .await
                .unwrap();
            assert_eq!(keys_of(&s, "alice").await, sorted(vec![a2, b]));
            // Revocation, keeping one; an in-flight write of the other is Missing.
            assert_eq!(s.revoke_user("alice", Some(&a2), T0).await.unwrap(), 1);
            assert!(s.load(&b, T0).await.unwrap().is_none());
            assert_eq!(
                s.apply(&b, &update("late", 1), ctx()).await.unwrap(),
                Applied::Missing
            );
            assert_eq!(keys_of(&s, "alice").await, vec![a2]);
            s.delete(&a2).await.unwrap();
            assert!(keys_of(&s, "alice").await.is_empty());
            drop(s);

            // A crash: frames in the log that redb does not hold.
            let (d, e) = (SessionKey::generate(), SessionKey::generate());
            let mut del = vec![DEL];
            del.extend_from_slice(c.as_bytes());
            let frames = [
                put_entry(&d, &user_record(json!("dora"))),
                put_entry(&e, &user_record(json!("dora"))),
                del,
            ]
            .concat();
            {
                let s = FileStore::open_with_user_key(&dir, cached, uid())
                    .await
                    .unwrap();
                s.flush().await.unwrap();
            }
            let seq = {
                let db = redb::Database::open(dir.join(FILE_NAME)).unwrap();
                let t = db.begin_read().unwrap();
                let m = t.open_table(META).unwrap();
                let v = m.get(CHECKPOINT_SEQ).unwrap().unwrap().value();
                v
            };
            std::fs::write(dir.join(LOG_NAME), frame(seq + 1, &frames)).unwrap();
            let s = FileStore::open_with_user_key(&dir, cached, uid())
                .await
                .unwrap();
            assert_eq!(keys_of(&s, "dora").await, sorted(vec![d, e]));
            assert!(keys_of(&s, "7").await.is_empty(), "c deleted by the replay");
            drop(s);

            // Another user key: rebuilt for it; none: dropped; back: rebuilt.
            let s = FileStore::open_with_user_key(&dir, cached, Some("n".into()))
                .await
                .unwrap();
            assert!(keys_of(&s, "dora").await.is_empty());
            drop(s);
            let s = FileStore::open(&dir, cached).await.unwrap();
            assert_eq!(s.revoke_user("dora", None, T0).await.unwrap(), 0);
            s.apply(&d, &update("uid", "zed"), ctx()).await.unwrap();
            drop(s);
            let s = FileStore::open_with_user_key(&dir, cached, uid())
                .await
                .unwrap();
            assert_eq!(keys_of(&s, "dora").await, vec![e]);
            assert_eq!(keys_of(&s, "zed").await, vec![d]);
            // The sweep takes them out of the index.
            let expires = s.load(&d, T0).await.unwrap().unwrap().expires_at;
            assert_eq!(s.clear_expired(expires).await.unwrap(), 2);
            assert!(keys_of(&s, "zed").await.is_empty());
            assert!(keys_of(&s, "dora").await.is_empty());
            assert_eq!(s.cached_len(), 0);
            drop(s);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
