//! Redis Cluster: commands for one slot straight to that slot's primary.
//!
//! The crate's [`ClusterConnection`] sends every command through its own
//! routing task, which hands it to the node's multiplexed connection's
//! task: two task wake-ups more per command than one server costs. Here a
//! command of a known shape whose keys are all in one slot goes from the
//! caller straight to a [`MultiplexedConnection`] to the primary of that
//! slot, looked up in a slot table learnt from `CLUSTER SLOTS`.
//!
//! Everything else goes to the crate's connection, which stays the
//! authority: commands of other shapes (`PING`, `SCRIPT LOAD` to every
//! node, `CLUSTER NODES`, `SCAN` routed by address), pipelines, slots the
//! table does not know (yet: it is learnt in the background after the
//! crate's connection is made, and a primary that could not be connected
//! to stays out of it until a later rebuild connects it; a command for
//! such a slot starts one), and every command the node answers with an error
//! the crate itself retries (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`,
//! `MASTERDOWN`, `LOADING`, a broken connection, a timeout): that command
//! is sent again through the crate, which follows the redirect and
//! retries as it always did, and the table is rebuilt in the background
//! (one rebuild at a time, at most one per [`REFRESH_INTERVAL`]; a node
//! connection that broke is replaced then). Any other reply (`NOSCRIPT`, a
//! script's error, `WRONGTYPE`...) is the caller's, as from the crate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    Arg, AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisError, RedisFuture, RetryMethod, Value,
};

/// How many hash slots a Redis Cluster has.
const SLOT_COUNT: u16 = 16384;

/// The least time between two rebuilds of the slot table.
const REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// No node: the slot's commands go to the crate.
const NO_NODE: u16 = u16::MAX;

/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag
/// (what is between the first `{` and the next `}`, when not empty), modulo
/// 16384.
fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let tag = &key[open + 1..];
            let close = tag.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &tag[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOT_COUNT
}

/// Where a command's keys are.
enum Keys {
    /// One key, the first argument (the rest are not keys).
    First,
    /// Every argument is a key.
    All,
    /// `EVAL`/`EVALSHA script numkeys key... arg...`.
    Script,
}

fn keys_of(name: &[u8]) -> Option<Keys> {
    let mut upper = [0u8; 12];
    let upper = upper.get_mut(..name.len())?;
    upper.copy_from_slice(name);
    upper.make_ascii_uppercase();
    Some(match &*upper {
        b"GET" | b"SET" | b"GETDEL" | b"HGET" | b"HMGET" | b"HSET" | b"HSETNX" | b"HDEL"
        | b"HGETALL" | b"HEXISTS" | b"HLEN" | b"SADD" | b"SREM" | b"SMEMBERS" | b"SCARD"
        | b"SISMEMBER" | b"EXPIRE" | b"PEXPIRE" | b"TTL" | b"PTTL" | b"PERSIST" | b"TYPE" => {
            Keys::First
        }
        b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" => Keys::All,
        b"EVAL" | b"EVALSHA" => Keys::Script,
        _ => return None,
    })
}

/// The one slot every key of `cmd` is in, when `cmd` has a known shape
/// and at least one key; `None` sends it to the crate.
fn route(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().map(|a| match a {
        Arg::Simple(s) => Some(s),
        Arg::Cursor => None,
    });
    let name = args.next()??;
    match keys_of(name)? {
        Keys::First => Some(slot(args.next()??)),
        Keys::All => same_slot(args),
        Keys::Script => {
            args.next()??;
            let n: usize = std::str::from_utf8(args.next()??).ok()?.parse().ok()?;
            // Fewer than `n` keys: the server refuses it (the crate's to tell).
            if n == 0 || args.len() < n {
                return None;
            }
            same_slot(args.take(n))
        }
    }
}

/// The slot of every key, when there is at least one and they agree.
fn same_slot<'a>(mut keys: impl Iterator<Item = Option<&'a [u8]>>) -> Option<u16> {
    let first = slot(keys.next()??);
    for k in keys {
        if slot(k?) != first {
            return None;
        }
    }
    Some(first)
}

/// What the nodes need besides their address, as for the crate's nodes.
pub(super) struct NodeParams {
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
}

/// One primary's connection.
struct Node {
    addr: String,
    conn: MultiplexedConnection,
    /// Set when the connection failed: the node's commands go to the crate
    /// until the next rebuild replaces it.
    broken: AtomicBool,
    /// This address's fast-path commands (see [`direct_commands`]).
    sent: Arc<AtomicU64>,
}

/// Slot -> index in `nodes`, or [`NO_NODE`].
struct Table {
    slots: Box<[u16]>,
    nodes: Vec<Arc<Node>>,
}

impl Table {
    fn empty() -> Table {
        Table {
            slots: vec![NO_NODE; SLOT_COUNT as usize].into_boxed_slice(),
            nodes: Vec::new(),
        }
    }
}

struct Direct {
    table: ArcSwap<Table>,
    params: Arc<NodeParams>,
    config: AsyncConnectionConfig,
    refreshing: AtomicBool,
    /// No rebuild before this many milliseconds after `epoch`.
    not_before: AtomicU64,
    epoch: Instant,
}

impl Direct {
    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// The crate's cluster connection with the fast path in front of it.
#[derive(Clone)]
pub(super) struct ClusterConn {
    fallback: ClusterConnection,
    direct: Arc<Direct>,
}

impl ClusterConn {
    /// The crate's connection (made as before); the slot table is learnt in
    /// the background, so a node that hangs does not hold the connection
    /// (its slots' commands go to the crate meanwhile).
    pub(super) async fn connect(
        client: &ClusterClient,
        params: Arc<NodeParams>,
    ) -> Result<ClusterConn, RedisError> {
        let fallback = client.get_async_connection().await?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(params.timeout)
            .set_response_timeout(params.timeout);
        let conn = ClusterConn {
            fallback,
            direct: Arc::new(Direct {
                table: ArcSwap::from_pointee(Table::empty()),
                params,
                config,
                refreshing: AtomicBool::new(false),
                not_before: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        };
        conn.refresh();
        Ok(conn)
    }

    /// The crate's own connection, for what the fast path does not do.
    pub(super) fn crate_conn(&mut self) -> &mut ClusterConnection {
        &mut self.fallback
    }

    /// Starts a rebuild of the slot table, unless one runs or ran less than
    /// [`REFRESH_INTERVAL`] ago.
    fn refresh(&self) {
        let d = &self.direct;
        if d.millis() < d.not_before.load(Ordering::Relaxed)
            || d.refreshing
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            // Bounded: a rebuild that never ended would stop every later one.
            let limit = me.direct.params.timeout * 3;
            match tokio::time::timeout(limit, me.rebuild()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "redis cluster: slot table not rebuilt"),
                Err(_) => tracing::debug!("redis cluster: slot table rebuild timed out"),
            }
            let d = &me.direct;
            let next = d.millis() + REFRESH_INTERVAL.as_millis() as u64;
            d.not_before.store(next, Ordering::Relaxed);
            d.refreshing.store(false, Ordering::Release);
        });
    }

    /// Asks `CLUSTER SLOTS` through the crate, connects to the primaries
    /// not yet connected (or whose connection broke), publishes the table.
    async fn rebuild(&self) -> Result<(), RedisError> {
        let mut crate_conn = self.fallback.clone();
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut crate_conn)
            .await?;
        let ranges = parse_slots(&reply);
        let mut addrs: Vec<(&str, u16)> =
            ranges.iter().map(|r| (r.host.as_str(), r.port)).collect();
        addrs.sort_unstable();
        addrs.dedup();
        let old = self.direct.table.load_full();
        let nodes = futures_util::future::join_all(addrs.iter().map(|&(host, port)| {
            let old = &old;
            async move {
                let addr = format!("{host}:{port}");
                if let Some(n) = old
                    .nodes
                    .iter()
                    .find(|n| n.addr == addr && !n.broken.load(Ordering::Relaxed))
                {
                    return Some(n.clone());
                }
                match self.connect_node(host, port).await {
                    Ok(conn) => Some(Arc::new(Node {
                        sent: counter(&addr),
                        addr,
                        conn,
                        broken: AtomicBool::new(false),
                    })),
                    Err(e) => {
                        tracing::debug!(node = %addr, error = %e, "redis cluster: no direct connection");
                        None
                    }
                }
            }
        }))
        .await;
        let mut table = Table::empty();
        let mut index = Vec::with_capacity(nodes.len());
        for n in nodes {
            index.push(n.map(|n| {
                table.nodes.push(n);
                (table.nodes.len() - 1) as u16
            }));
        }
        for r in &ranges {
            let at = addrs.binary_search(&(r.host.as_str(), r.port)).ok();
            if let Some(i) = at.and_then(|a| index[a]) {
                table.slots[r.start as usize..=r.end as usize].fill(i);
            }
        }
        self.direct.table.store(Arc::new(table));
        Ok(())
    }

    async fn connect_node(
        &self,
        host: &str,
        port: u16,
    ) -> Result<MultiplexedConnection, RedisError> {
        let p = &self.direct.params;
        let addr = if p.tls {
            ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_string(), port)
        };
        let client = Client::open(ConnectionInfo {
            addr,
            redis: RedisConnectionInfo {
                db: 0,
                username: p.username.clone(),
                password: p.password.clone(),
                ..Default::default()
            },
        })?;
        client
            .get_multiplexed_async_connection_with_config(&self.direct.config)
            .await
    }

    /// The node serving `slot` in the current table, if any and healthy.
    fn node(&self, slot: u16) -> Option<Arc<Node>> {
        let table = self.direct.table.load();
        let node = table.nodes.get(table.slots[slot as usize] as usize)?;
        (!node.broken.load(Ordering::Relaxed)).then(|| node.clone())
    }

    async fn command(&mut self, cmd: &Cmd) -> Result<Value, RedisError> {
        if let Some(slot) = route(cmd) {
            match self.node(slot) {
                None => self.refresh(),
                Some(node) => {
                    let reply = node.conn.clone().req_packed_command(cmd).await;
                    let handed_over = match &reply {
                        Ok(Value::ServerError(e)) => crate_retries(&e.clone().into()),
                        Ok(_) => false,
                        Err(e) => {
                            if e.is_unrecoverable_error() {
                                node.broken.store(true, Ordering::Relaxed);
                            }
                            crate_retries(e)
                        }
                    };
                    if !handed_over {
                        node.sent.fetch_add(1, Ordering::Relaxed);
                        return reply;
                    }
                    // Sent again through the crate. The node refused a
                    // redirected or retryable command without running it;
                    // after an I/O error or a timeout it may have run it,
                    // and the crate's own connection sends such a command
                    // again too (it retries after I/O errors and
                    // timeouts), so this keeps the semantics of sending
                    // every command through the crate: no new double
                    // execution. The store's writes are compare-and-set
                    // scripts, which a second run does not apply twice.
                    FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    self.refresh();
                }
            }
        }
        self.fallback.req_packed_command(cmd).await
    }
}

/// Whether the crate's cluster connection would send the command again
/// after this error (a redirect, a retryable refusal, a connection failure
/// or a timeout); `NOSCRIPT`, `WRONGTYPE`, a script's error are not.
fn crate_retries(e: &RedisError) -> bool {
    !matches!(e.retry_method(), RetryMethod::NoRetry)
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.command(cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.fallback.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.fallback.get_db()
    }
}

/// One `CLUSTER SLOTS` range and its primary.
#[derive(Debug, PartialEq)]
struct Range {
    start: u16,
    end: u16,
    host: String,
    port: u16,
}

/// The ranges of a `CLUSTER SLOTS` reply whose primary has a usable
/// endpoint (an empty or `?` host, which would need the address of the node
/// that answered, is left to the crate).
fn parse_slots(reply: &Value) -> Vec<Range> {
    let int = |v: &Value| match v {
        Value::Int(i) => Some(*i),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|r| {
            let Value::Array(f) = r else { return None };
            let Value::Array(primary) = f.get(2)? else {
                return None;
            };
            let start = u16::try_from(int(f.first()?)?).ok()?;
            let end = u16::try_from(int(f.get(1)?)?).ok()?;
            let host = text(primary.first()?)?;
            let port = u16::try_from(int(primary.get(1)?)?).ok()?;
            (start <= end && end < SLOT_COUNT && !host.is_empty() && host != "?" && port != 0)
                .then_some(Range {
                    start,
                    end,
                    host,
                    port,
                })
        })
        .collect()
}

/// Fast-path commands answered, per node address (`host:port` as in the
/// slot map), and commands handed over to the crate after a fast-path try.
static SENT: Mutex<Vec<(String, Arc<AtomicU64>)>> = Mutex::new(Vec::new());
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

fn counter(addr: &str) -> Arc<AtomicU64> {
    let mut all = SENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = all.iter().find(|(a, _)| a == addr) {
        return c.clone();
    }
    let c = Arc::new(AtomicU64::new(0));
    all.push((addr.to_string(), c.clone()));
    c
}

/// For tests: how many commands this process sent to the cluster node
/// `addr` (`host:port`) on the fast path and had answered there.
#[doc(hidden)]
pub fn direct_commands(addr: &str) -> u64 {
    SENT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(a, _)| a == addr)
        .map_or(0, |(_, c)| c.load(Ordering::Relaxed))
}

/// For tests: how many commands this process tried on the fast path and
/// sent again through the crate's cluster connection (a redirect, a
/// retryable refusal, a connection failure or a timeout).
#[doc(hidden)]
pub fn fallback_commands() -> u64 {
    FALLBACKS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From `redis-cli -p PORT cluster keyslot KEY` on redis-server 7.0.15.
    #[test]
    fn slots_as_redis_computes_them() {
        for (key, want) in [
            ("foo", 12182),
            ("bar", 5061),
            ("{user1000}.following", 3443),
            ("{user1000}.followers", 3443),
            ("sessiongate:s:abc", 14419),
            ("{}x", 10595),
            ("{}", 15257),
            ("a{}b{c}", 7353),
            ("{a", 10276),
            ("a}{b", 11640),
            ("foo{bar}{zap}", 5061),
            ("foo{{bar}}", 4015),
            ("123456789", 12739),
            ("sessiongate:s:0123456789abcdefghijklmnopqrstuv", 9374),
            ("sessiongate:u:alice", 5690),
        ] {
            assert_eq!(slot(key.as_bytes()), want, "{key}");
        }
    }

    fn cmd(args: &[&str]) -> Cmd {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c
    }

    #[test]
    fn which_commands_take_the_fast_path() {
        let s = |k: &str| Some(slot(k.as_bytes()));
        for (args, want) in [
            (&["HMGET", "foo", "v", "m"][..], s("foo")),
            (&["hget", "bar", "v"], s("bar")),
            (
                &["SMEMBERS", "sessiongate:u:alice"],
                s("sessiongate:u:alice"),
            ),
            // Members are not keys.
            (&["SREM", "foo", "bar", "baz"], s("foo")),
            (&["DEL", "foo"], s("foo")),
            (
                &["DEL", "{user1000}.following", "{user1000}.followers"],
                Some(3443),
            ),
            // Keys in two slots: the crate splits or refuses them.
            (&["DEL", "foo", "bar"], None),
            (&["EVALSHA", "abc123", "1", "foo", "bar", "baz"], s("foo")),
            (&["EVAL", "return 1", "2", "{a}1", "{a}2", "x"], s("{a}1")),
            // A script over two slots (as Cycle-Key would be) is not sent to one node.
            (&["EVALSHA", "abc123", "2", "foo", "bar"], None),
            (&["EVALSHA", "abc123", "0", "foo"], None),
            (&["EVALSHA", "abc123", "3", "foo", "foo"], None),
            (&["EVALSHA", "abc123", "x", "foo"], None),
            (&["EVALSHA", "abc123"], None),
            (&["HMGET"], None),
            (&["PING"], None),
            (&["SCRIPT", "LOAD", "return 1"], None),
            (&["CLUSTER", "NODES"], None),
            (&["SCAN", "0", "MATCH", "x*"], None),
            (&["MGET", "foo", "bar"], None),
            (&["AVERYLONGCOMMANDNAME", "foo"], None),
        ] {
            assert_eq!(route(&cmd(args)), want, "{args:?}");
        }
    }

    /// Records the commands sent, answers 1.
    struct Recorder(Vec<Cmd>);

    impl ConnectionLike for Recorder {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
            self.0.push(cmd.clone());
            Box::pin(async { Ok(Value::Int(1)) })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a Pipeline,
            _: usize,
            _: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            unreachable!()
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    /// The store's scripts as the crate sends them (`EVALSHA sha 1 key
    /// args...`) are routed by their key.
    #[tokio::test]
    async fn the_stores_scripts_take_the_fast_path() {
        let scripts = &*super::super::SCRIPTS;
        let mut rec = Recorder(Vec::new());
        let key = "sessiongate:s:abc";
        let _: i64 = scripts
            .apply
            .key(key)
            .arg("v1")
            .arg("v2")
            .invoke_async(&mut rec)
            .await
            .unwrap();
        let _: i64 = scripts
            .delete
            .key(key)
            .invoke_async(&mut rec)
            .await
            .unwrap();
        let _: i64 = scripts
            .index_add
            .key("sessiongate:u:alice")
            .arg(key)
            .arg(10)
            .invoke_async(&mut rec)
            .await
            .unwrap();
        let routes: Vec<_> = rec.0.iter().map(route).collect();
        assert_eq!(routes, [Some(14419), Some(14419), Some(5690)]);
        assert!(rec
            .0
            .iter()
            .all(|c| c.args_iter().next() == Some(Arg::Simple(&b"EVALSHA"[..]))));
    }

    #[test]
    fn cluster_slots_replies() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let node = |h: &str, p: i64| Value::Array(vec![b(h), Value::Int(p), b("id")]);
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node("", 7001)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("h3", 7002)]),
            Value::Array(vec![Value::Int(9), Value::Int(16384), node("h4", 7002)]),
            Value::Int(3),
        ]);
        assert_eq!(
            parse_slots(&reply),
            vec![
                Range {
                    start: 0,
                    end: 5460,
                    host: "127.0.0.1".into(),
                    port: 7000
                },
                Range {
                    start: 10923,
                    end: 16383,
                    host: "h3".into(),
                    port: 7002
                },
            ]
        );
    }
}
