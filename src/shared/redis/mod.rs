//! The Redis engine (Redis or Valkey), over a small RESP2 client of our own
//! on `std::net::TcpStream`. URL: `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`
//! (port 6379 and DB 0 by default; `%XX` escapes in the password; IPv6 hosts
//! in brackets).
//!
//! Files: `url.rs` (the URL), `resp.rs` (the RESP2 codec, pure), `conn.rs`
//! (one connection), this file (the engine: pool, commands, Lua);
//! `tests.rs` against a real redis-server.
//!
//! Keys (forever: add new ones, never rename):
//! ```text
//! casfs:<namespace>:r:<path bytes>   a record: Record::encode() bytes
//! casfs:<namespace>:l:<dir path>     a set: `f/<name>`, `d/<name>` listed in it
//! casfs:b:<64 hex>                   a blob: its bytes (all namespaces)
//! casfs:<namespace>:u                a sorted set: path -> last use (Unix s)
//! casfs:bt                           a sorted set: blob hex -> last put (Unix s)
//! casfs:lease:<name>                 a lease: its holder, expiring (EX)
//! casfs:namespaces                   a set: every namespace opened or put to
//! casfs:format                       "1": the layout above (SET NX at open)
//! ```
//! Times are the client's Unix seconds, moved forward only (`ZADD GT`,
//! Redis 6.2 or later); lease expiry is the server's own (`SET EX`), so
//! hosts' clocks do not matter to it.
//! Keys are binary-safe, so the path goes in as is. A namespace has no ':'
//! (`valid_namespace`), so the two families cannot collide.
//!
//! Protocol:
//! - create-only record: `SET key value NX`. OK = stored; nil = a record is
//!   there: `GET` it and report `Put::Exists`. If the GET finds nothing (it
//!   was deleted in between), the SET is tried once more.
//! - replace record: `SET key value` (atomic, last writer wins).
//! - every record put is pipelined with one `SADD` per level of its path
//!   (its name in its parent's listing, each ancestor in its own parent's):
//!   one round trip re-asserts what an eviction may have dropped.
//! - get_record: `GET` (bounded by `RECORD_BYTES_MAX`) and `EXISTS` of the
//!   path's listing, pipelined (one round trip): a key of another type, a
//!   longer value (its connection is dropped) or one that does not decode
//!   is `TierError::Data`; no record but a listing is `Record::implied_dir`.
//! - replace a damaged record: a Lua script compares what is there with
//!   the damaged version and sets the newcomer only if it is the same.
//!   A create-only put that finds a damaged record replaces it this way.
//! - list: `SSCAN` (bounded passes and names).
//! - collection: `SCAN MATCH` pages of records and blobs (with their
//!   times, pipelined); compare-and-delete of a record, and of a blob
//!   older than a bound, in Lua (`DELETE_RECORD_LUA`, `DELETE_BLOB_LUA`),
//!   a record taking its name out of its listing in the same script (and
//!   each listing left empty out of its parent's while that directory has
//!   no record of its own).
//! - put_blob: `SET key bytes NX` (nil = already there = fine); blobs of
//!   `REDIS_BLOB_PROBE_BYTES_MIN` or more are first probed with `EXISTS`, so
//!   a blob other hosts already shared is not sent again.
//! - has_blob: `EXISTS`; get_blob: `GET`, the reply bounded by `max_bytes`
//!   (a bigger blob is a `Data` error about that blob, and its connection is dropped).
//!
//! Invariants:
//! - Every reply is bounded (`REDIS_REPLY_BYTES_MAX`, lines by
//!   `REDIS_LINE_BYTES_MAX`, arrays by `REDIS_ARRAY_LEN_MAX` and
//!   `REDIS_ARRAY_DEPTH_MAX`); nothing a server sends makes us allocate more.
//! - A connection goes back to the pool only after a call that succeeded;
//!   after any error its protocol state is unknown and it is dropped. The
//!   pool keeps at most `REDIS_POOL_CONNECTIONS_MAX` idle connections and
//!   connects lazily, so a Redis that comes back is used again.
//! - A pooled connection found dead (the server restarted: EOF, reset,
//!   broken pipe) is replaced by a fresh one and the command sent once more;
//!   every command we send gives the same result when repeated.
//! - Timeouts: connecting waits at most the configured timeout, and so does
//!   every socket read and write (an idle bound: a stalled server gives
//!   `TierError::Timeout` within about one timeout); while a blob streams,
//!   reads and writes wait up to `TRANSFER_IDLE_MS_MIN` (a blob that keeps
//!   flowing may take as long as it needs). Name resolution of a
//!   host name uses the system resolver and has no timeout of its own: give
//!   an address, or a name the resolver answers locally.
//! - The password never appears in `describe()`, logs or errors. It comes
//!   from `EngineConfig::password` (a root-only file, never argv) or, with
//!   a warning at mount, from the URL.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::{
    listing_chain, Engine, EngineConfig, Listed, Put, Record, RecordKind, Seen, TierError,
    TierResult, RECORD_BYTES_MAX,
};
use crate::store::ids::BlobId;

mod conn;
mod resp;
#[cfg(test)]
mod tests;
mod url;

use conn::Conn;
pub(crate) use resp::read_reply;
pub(crate) use resp::Reply;
use resp::{read_bulk_into, Bulk};
use url::{parse_url, Target};

/// Bound on one reply, framing included (Redis's own default bound on a
/// value, proto-max-bulk-len, is 512 MiB).
pub const REDIS_REPLY_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Room for a reply's framing (`$<len>\r\n`, status lines) on top of its value.
const REDIS_REPLY_FRAMING_BYTES: u64 = 4096;
/// The biggest blob we store, so that it can always be read back.
pub const REDIS_BLOB_BYTES_MAX: u64 = REDIS_REPLY_BYTES_MAX - REDIS_REPLY_FRAMING_BYTES;
/// Bound on a status, error or length line.
const REDIS_LINE_BYTES_MAX: usize = 64 * 1024;
/// (SSCAN brings about `LIST_SCAN_COUNT` names a pass, sometimes more.)
const REDIS_ARRAY_LEN_MAX: usize = 8 * LIST_SCAN_COUNT;
const REDIS_ARRAY_DEPTH_MAX: usize = 2;
/// Idle connections kept for reuse (more may be open while calls run):
/// enough for every request caller of a 64-thread host and the background
/// callers, so a burst of lookups does not pay a connect each.
pub const REDIS_POOL_CONNECTIONS_MAX: usize = 128;
pub const REDIS_PORT_DEFAULT: u16 = 6379;
/// A record is about 130 bytes; a bigger value under a record key is not one.
/// Bound on SET NX attempts when the existing record vanishes before our GET.
const CREATE_ATTEMPTS_MAX: usize = 2;
/// Blobs at least this big are probed with EXISTS before being sent.
const REDIS_BLOB_PROBE_BYTES_MIN: usize = 64 * 1024;
/// Arguments bigger than this are written straight from the caller's buffer.
const REDIS_INLINE_ARG_BYTES_MAX: usize = 16 * 1024;
const REDIS_READ_BUFFER_BYTES: usize = 64 * 1024;
/// How much of a key an error message quotes.
const KEY_TEXT_CHARS_MAX: usize = 160;

pub struct RedisEngine {
    target: Target,
    /// `redis://HOST:PORT/DB`, no password.
    described: String,
    timeout: Duration,
    /// `casfs:<namespace>:r:`
    record_prefix: Vec<u8>,
    /// `casfs:<namespace>:l:`
    list_prefix: Vec<u8>,
    /// `casfs:<namespace>:u`
    used_key: Vec<u8>,
    namespace: String,
    pool: Mutex<Vec<Conn>>,
    healed: std::sync::atomic::AtomicU64,
}

/// A record key as read.
enum Raw {
    Missing,
    Good(Record),
    Damaged(Seen, TierError),
}

/// Compare-and-set of a damaged record. KEYS[1] the record; ARGV[1] the
/// kind of damage seen (`bytes`, `big`, `type`), ARGV[2] the bytes seen,
/// ARGV[3] the newcomer. Returns 1 if it replaced.
const REPLACE_DAMAGED_LUA: &[u8] = b"local t = redis.call('TYPE', KEYS[1]).ok
if ARGV[1] == 'bytes' then
  if t ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
elseif ARGV[1] == 'big' then
  if t ~= 'string' or redis.call('STRLEN', KEYS[1]) <= tonumber(ARGV[4]) then return 0 end
else
  if t == 'string' or t == 'none' then return 0 end
  redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[1], ARGV[3])
return 1";
/// The one key layout this code knows (`casfs:format`).
pub const REDIS_FORMAT: &str = "1";

/// Compare-and-delete of a record. KEYS[1] the record, KEYS[2] the
/// last-use set, then pairs (listing key, record key of the directory it
/// lists) deepest first; ARGV[1..3] the version seen as in
/// `REPLACE_DAMAGED_LUA` (ARGV[3] the size bound), ARGV[4] the path, then
/// one listing member per pair.
const DELETE_RECORD_LUA: &[u8] = b"local t = redis.call('TYPE', KEYS[1]).ok
if ARGV[1] == 'bytes' then
  if t ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
elseif ARGV[1] == 'big' then
  if t ~= 'string' or redis.call('STRLEN', KEYS[1]) <= tonumber(ARGV[3]) then return 0 end
else
  if t == 'string' or t == 'none' then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[4])
local i = 0
while 4 + 2 * i <= #KEYS do
  local l = KEYS[3 + 2 * i]
  redis.call('SREM', l, ARGV[5 + i])
  if redis.call('SCARD', l) > 0 then break end
  if redis.call('EXISTS', KEYS[4 + 2 * i]) == 1 then break end
  i = i + 1
end
return 1";
/// Deletes a blob last put before ARGV[2]. KEYS[1] the blob, KEYS[2] the
/// blob-time set; ARGV[1] its hex.
const DELETE_BLOB_LUA: &[u8] = b"local t = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not t or tonumber(t) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])";
/// Takes or renews a lease. KEYS[1] the lease; ARGV[1] the holder,
/// ARGV[2] its time to live (s). Returns {1, ttl} or {0, holder, ttl}.
const LEASE_LUA: &[u8] = b"local v = redis.call('GET', KEYS[1])
if not v or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return {1, tonumber(ARGV[2])}
end
return {0, v, redis.call('TTL', KEYS[1])}";
const RELEASE_LUA: &[u8] =
    b"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0";
/// Moves the last use of existing records forward. KEYS[1] the last-use
/// set, then one record key per path; ARGV[1] the time, then the paths.
const NOTE_USED_LUA: &[u8] = b"for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('ZADD', KEYS[1], 'GT', ARGV[1], ARGV[i])
  end
end
return 0";
/// Keys a scan page asks SCAN to look at.
const SCAN_COUNT_MAX: usize = 1000;

/// Names asked of one SSCAN pass, and bound on passes for one listing
/// (SSCAN's COUNT is a hint: passes may bring fewer).
const LIST_SCAN_COUNT: usize = 1024;
/// Bound on one SSCAN reply (names are at most 255 bytes).
const LIST_REPLY_BYTES_MAX: u64 = 1 << 20;
const LIST_SCAN_PASSES_MAX: usize = 4 * super::LIST_NAMES_MAX / LIST_SCAN_COUNT;

impl RedisEngine {
    /// Parses the URL and checks the server once. An unreachable server is
    /// only logged (it may come up later; calls reconnect), but a refused
    /// password or database is a configuration error and fails here.
    pub fn open(url: &str, config: &EngineConfig) -> Result<RedisEngine, String> {
        let mut target = parse_url(url)?;
        if let Some(password) = &config.password {
            if target.password.is_some() {
                return Err(
                    "the redis URL carries a password and a password file was given too: keep only the file".into(),
                );
            }
            target.password = Some(password.clone());
        }
        if target.user.is_some() && target.password.is_none() {
            return Err(
                "the redis URL names a user but no password: give it in --shared-password-file"
                    .into(),
            );
        }
        if !super::valid_namespace(&config.namespace) {
            return Err(format!("redis: bad namespace {:?}", config.namespace));
        }
        let engine = RedisEngine {
            described: target.describe(),
            target,
            timeout: config.timeout.max(Duration::from_millis(1)),
            record_prefix: format!("casfs:{}:r:", config.namespace).into_bytes(),
            list_prefix: format!("casfs:{}:l:", config.namespace).into_bytes(),
            used_key: format!("casfs:{}:u", config.namespace).into_bytes(),
            namespace: config.namespace.clone(),
            pool: Mutex::new(Vec::new()),
            healed: std::sync::atomic::AtomicU64::new(0),
        };
        let probe = Conn::connect(&engine.target, engine.timeout)
            .and_then(|mut conn| conn.command(&[b"PING"], 0).map(|reply| (conn, reply)));
        match probe {
            Ok((conn, Reply::Status(_))) => {
                engine.give_back(conn);
                engine.check_format()?;
            }
            Ok((_, Reply::Error(m))) if m.starts_with("NOAUTH") => {
                return Err(format!(
                    "{}: the server wants a password (redis://:PASSWORD@HOST:PORT)",
                    engine.described
                ))
            }
            Ok((_, reply)) => warn!(
                "shared engine={} open=ping-answered reply={reply:?}",
                engine.described
            ),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(format!("{}: {e}", engine.described));
            }
            Err(e) => warn!(
                "shared engine={} open=unreachable error={e:?} outcome=retry-on-use",
                engine.described
            ),
        }
        Ok(engine)
    }

    /// Writes the format key if there is none (`SET NX`), refuses a
    /// format this code does not know, and registers the namespace.
    fn check_format(&self) -> Result<(), String> {
        let fail = |e: TierError| format!("{}: format key: {e}", self.described);
        let replies = self
            .pipeline(
                &[
                    vec![
                        b"SET".as_slice(),
                        b"casfs:format",
                        REDIS_FORMAT.as_bytes(),
                        b"NX",
                    ],
                    vec![b"GET".as_slice(), b"casfs:format"],
                    vec![
                        b"SADD".as_slice(),
                        b"casfs:namespaces",
                        self.namespace.as_bytes(),
                    ],
                ],
                RECORD_BYTES_MAX,
            )
            .map_err(fail)?;
        match &replies[1] {
            Reply::Bulk(Some(v)) if v == REDIS_FORMAT.as_bytes() => Ok(()),
            Reply::Bulk(Some(v)) => Err(format!(
                "{}: the database holds casfs key layout {:?} (casfs:format); this casfs knows only {REDIS_FORMAT:?}: use a newer casfs or another database",
                self.described,
                String::from_utf8_lossy(v)
            )),
            other => Err(format!("{}: format key: unexpected reply {other:?}", self.described)),
        }
    }

    /// Moves blob `id`'s last put to now (its grace starts again).
    fn stamp_blob(&self, id: &BlobId) -> TierResult<()> {
        let now = super::now_s().to_string();
        self.call(
            &[
                b"ZADD",
                b"casfs:bt",
                b"GT",
                now.as_bytes(),
                id.hex().as_bytes(),
            ],
            0,
        )?;
        Ok(())
    }

    /// The SCAN of one page: the keys matching `pattern` and the next cursor.
    fn scan_keys(
        &self,
        pattern: &[u8],
        cursor: &[u8],
        max: usize,
    ) -> TierResult<super::Page<Vec<u8>>> {
        let cursor: &[u8] = if cursor.is_empty() { b"0" } else { cursor };
        let count = max.clamp(1, SCAN_COUNT_MAX).to_string();
        let reply = self.call(
            &[
                b"SCAN",
                cursor,
                b"MATCH",
                pattern,
                b"COUNT",
                count.as_bytes(),
            ],
            LIST_REPLY_BYTES_MAX,
        )?;
        let Reply::Array(Some(parts)) = reply else {
            return Err(self.unexpected("SCAN", pattern, &reply));
        };
        match parts.as_slice() {
            [Reply::Bulk(Some(next)), Reply::Array(Some(keys))] => {
                let keys = keys
                    .iter()
                    .filter_map(|k| match k {
                        Reply::Bulk(Some(k)) => Some(k.clone()),
                        _ => None,
                    })
                    .collect();
                let next = (next.as_slice() != b"0").then(|| next.clone());
                Ok(super::Page { items: keys, next })
            }
            _ => Err(TierError::Protocol(format!(
                "{} SCAN: unexpected reply shape",
                self.described
            ))),
        }
    }

    fn record_key(&self, path: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.record_prefix.len() + path.len());
        key.extend_from_slice(&self.record_prefix);
        key.extend_from_slice(path);
        key
    }

    fn list_key(&self, path: &[u8]) -> Vec<u8> {
        let mut key = self.list_prefix.clone();
        key.extend_from_slice(path);
        key
    }

    /// The SADDs that list every level of `path`.
    fn list_commands(&self, path: &[u8], is_dir: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
        listing_chain(path, is_dir)
            .into_iter()
            .map(|(parent, name, dir)| {
                let mut member = if dir { b"d/".to_vec() } else { b"f/".to_vec() };
                member.extend_from_slice(name);
                (self.list_key(parent), member)
            })
            .collect()
    }

    /// Sends commands in one round trip on one connection and reads every
    /// reply; error replies are returned as they are, for the caller.
    fn pipeline(&self, cmds: &[Vec<&[u8]>], value_bytes_max: u64) -> TierResult<Vec<Reply>> {
        let name = command_name(&cmds[0]);
        let run = |conn: &mut Conn| -> io::Result<Vec<Reply>> {
            for c in cmds {
                conn.send(c)?;
            }
            cmds.iter()
                .map(|_| read_reply(&mut conn.reader, value_bytes_max))
                .collect()
        };
        let pooled = self.pool().pop();
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let replies = match run(&mut conn) {
            Ok(r) => r,
            Err(e) if reused && is_dead_connection(&e) => {
                drop(conn);
                self.pool().clear();
                conn = self.connect()?;
                run(&mut conn).map_err(|e| self.tier_error(&name, e))?
            }
            Err(e) => return Err(self.tier_error(&name, e)),
        };
        self.give_back(conn);
        Ok(replies)
    }

    /// Reads a record key and whether `path` has a listing, in one round trip.
    fn read_raw(&self, path: &[u8]) -> TierResult<(Raw, bool)> {
        let key = self.record_key(path);
        let lkey = self.list_key(path);
        let what = format!("{} key {}", self.described, key_text(&key));
        let replies = match self.pipeline(
            &[
                vec![b"GET".as_slice(), &key],
                vec![b"EXISTS".as_slice(), &lkey],
            ],
            RECORD_BYTES_MAX,
        ) {
            Ok(r) => r,
            // The value is over the bound (refused before it was read).
            Err(TierError::Data(m)) => {
                return Ok((Raw::Damaged(Seen::Oversize, TierError::Data(m)), false))
            }
            Err(e) => return Err(e),
        };
        let listed = matches!(replies[1], Reply::Int(n) if n > 0);
        let raw = match &replies[0] {
            Reply::Bulk(None) => Raw::Missing,
            Reply::Bulk(Some(bytes)) => match Record::decode_or_data(bytes, &what) {
                Ok(r) => Raw::Good(r),
                Err(e) => Raw::Damaged(Seen::Bytes(bytes.clone()), e),
            },
            Reply::Error(m) if m.starts_with("WRONGTYPE") => Raw::Damaged(
                Seen::WrongType,
                TierError::Data(format!("{what}: not a record ({m})")),
            ),
            Reply::Error(m) => return Err(self.error_reply(&what, m)),
            other => return Err(self.unexpected("GET", &key, other)),
        };
        Ok((raw, listed))
    }

    fn pool(&self) -> MutexGuard<'_, Vec<Conn>> {
        // A panic while holding the lock leaves a valid Vec: use it.
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn give_back(&self, conn: Conn) {
        let mut pool = self.pool();
        if pool.len() < REDIS_POOL_CONNECTIONS_MAX {
            pool.push(conn);
        }
    }

    fn connect(&self) -> TierResult<Conn> {
        Conn::connect(&self.target, self.timeout).map_err(|e| self.tier_error("connect", e))
    }

    /// Sends one command and reads its reply (whose value may be up to
    /// `value_bytes_max`). Error replies become `Unavailable`.
    fn call(&self, args: &[&[u8]], value_bytes_max: u64) -> TierResult<Reply> {
        let name = command_name(args);
        let pooled = self.pool().pop();
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let reply = match conn.command(args, value_bytes_max) {
            Ok(reply) => reply,
            Err(e) if reused && is_dead_connection(&e) => {
                // The server went away since this connection was pooled (a
                // restart): the others are dead too. Start afresh, once.
                debug!(
                    "shared engine={} command={name} error={e} outcome=reconnect",
                    self.described
                );
                drop(conn);
                self.pool().clear();
                conn = self.connect()?;
                conn.command(args, value_bytes_max)
                    .map_err(|e| self.tier_error(&name, e))?
            }
            Err(e) => return Err(self.tier_error(&name, e)),
        };
        // A whole reply was read: the connection is in a known state.
        self.give_back(conn);
        if let Reply::Error(m) = &reply {
            return Err(self.error_reply(&format!("{} {name}", self.described), m));
        }
        Ok(reply)
    }

    /// The socket timeout while a blob streams (see `TRANSFER_IDLE_MS_MIN`).
    fn transfer_idle(&self) -> Duration {
        self.timeout
            .max(Duration::from_millis(super::TRANSFER_IDLE_MS_MIN))
    }

    /// What an error reply means, in the server's own words: about one
    /// key (`WRONGTYPE`: `Data`), an outage (the server cannot serve now:
    /// loading its data, failing over, busy with a script), or a refusal
    /// (anything else: `OOM command not allowed` at `maxmemory` with
    /// `noeviction`, `READONLY` on a replica, `NOPERM`, a changed password).
    fn error_reply(&self, what: &str, m: &str) -> TierError {
        let text = format!("{what}: the server refused: {m}");
        match m.split(' ').next().unwrap_or("") {
            "WRONGTYPE" => TierError::Data(text),
            "LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" => {
                TierError::Unavailable(text)
            }
            _ => TierError::Refused(text),
        }
    }

    fn tier_error(&self, what: &str, e: io::Error) -> TierError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TierError::Timeout,
            io::ErrorKind::FileTooLarge => {
                TierError::Data(format!("{} {what}: {e}", self.described))
            }
            io::ErrorKind::InvalidData => {
                TierError::Protocol(format!("{} {what}: {e}", self.described))
            }
            io::ErrorKind::UnexpectedEof => TierError::Unavailable(format!(
                "{} {what}: the server closed the connection",
                self.described
            )),
            _ => TierError::Unavailable(format!("{} {what}: {e}", self.described)),
        }
    }

    fn unexpected(&self, what: &str, key: &[u8], reply: &Reply) -> TierError {
        TierError::Protocol(format!(
            "{} {what} {}: unexpected reply {reply:?}",
            self.described,
            key_text(key)
        ))
    }
}

impl Engine for RedisEngine {
    fn get_record(&self, path: &[u8]) -> TierResult<Option<Record>> {
        match self.read_raw(path)? {
            (Raw::Good(r), _) => Ok(Some(r)),
            (Raw::Damaged(_, e), _) => Err(e),
            (Raw::Missing, true) => Ok(Some(Record::implied_dir())),
            (Raw::Missing, false) => Ok(None),
        }
    }

    fn put_record(&self, path: &[u8], record: &Record, create_only: bool) -> TierResult<Put> {
        let key = self.record_key(path);
        let value = record.encode();
        let lists = self.list_commands(path, record.kind == RecordKind::Dir);
        let shown = || path.escape_ascii().to_string();
        let mut set: Vec<&[u8]> = vec![b"SET", &key, &value];
        if create_only {
            set.push(b"NX");
        }
        let now = super::now_s().to_string();
        let mut cmds = vec![set];
        // A publication is a use (also when it finds the record there).
        cmds.push(vec![
            b"ZADD".as_slice(),
            &self.used_key,
            b"GT",
            now.as_bytes(),
            path,
        ]);
        // Every namespace that holds records is known to blob collection,
        // also when the server was down at open.
        cmds.push(vec![
            b"SADD".as_slice(),
            b"casfs:namespaces",
            self.namespace.as_bytes(),
        ]);
        for (lkey, member) in &lists {
            cmds.push(vec![b"SADD".as_slice(), lkey, member]);
        }
        let replies = self.pipeline(&cmds, 0)?;
        for r in &replies[1..] {
            if let Reply::Error(m) = r {
                // A listing key of another type: the listing is best effort.
                debug!(
                    "shared list path={:?} error={m} outcome=not-listed",
                    shown()
                );
            }
        }
        match &replies[0] {
            Reply::Status(s) if s == "OK" => {
                debug!("shared put_record path={:?} outcome=stored", shown());
                return Ok(Put::Stored);
            }
            Reply::Bulk(None) if create_only => {}
            Reply::Error(m) => {
                return Err(
                    self.error_reply(&format!("{} SET {}", self.described, key_text(&key)), m)
                )
            }
            other => return Err(self.unexpected("SET", &key, other)),
        }
        for _ in 0..CREATE_ATTEMPTS_MAX {
            match self.read_raw(path)?.0 {
                Raw::Good(existing) => {
                    debug!("shared put_record path={:?} outcome=kept-existing", shown());
                    return Ok(Put::Exists(existing));
                }
                Raw::Damaged(seen, _) => {
                    if self.replace_damaged(path, &seen, record)? {
                        warn!(
                            "shared put_record path={:?} outcome=replaced-damaged-record",
                            shown()
                        );
                        return Ok(Put::Stored);
                    }
                }
                Raw::Missing => {
                    // Deleted between our SET NX and our read: try again.
                    if let Reply::Status(s) = self.call(&[b"SET", &key, &value, b"NX"], 0)? {
                        if s == "OK" {
                            return Ok(Put::Stored);
                        }
                    }
                }
            }
        }
        Err(TierError::Unavailable(format!(
            "{} key {}: the record kept changing under a create-only put ({CREATE_ATTEMPTS_MAX} attempts)",
            self.described,
            key_text(&key)
        )))
    }

    fn has_blob(&self, id: &BlobId) -> TierResult<bool> {
        let key = blob_key(id);
        match self.call(&[b"EXISTS", &key], 0)? {
            Reply::Int(n) => Ok(n > 0),
            other => Err(self.unexpected("EXISTS", &key, &other)),
        }
    }

    fn get_blob(&self, id: &BlobId, max_bytes: u64) -> TierResult<Option<Vec<u8>>> {
        let key = blob_key(id);
        match self.call(&[b"GET", &key], max_bytes.min(REDIS_BLOB_BYTES_MAX))? {
            Reply::Bulk(None) => Ok(None),
            Reply::Bulk(Some(bytes)) if bytes.len() as u64 > max_bytes => {
                Err(TierError::Data(format!(
                    "{} blob {id}: {} bytes, over the {max_bytes} allowed",
                    self.described,
                    bytes.len()
                )))
            }
            Reply::Bulk(Some(bytes)) => Ok(Some(bytes)),
            other => Err(self.unexpected("GET", &key, &other)),
        }
    }

    fn put_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()> {
        debug_assert_eq!(
            blake3::hash(bytes).as_bytes(),
            &id.0,
            "put_blob with bytes that are not {id}"
        );
        if bytes.len() as u64 > REDIS_BLOB_BYTES_MAX {
            return Err(TierError::Refused(format!(
                "{} blob {id}: {} bytes, over the {REDIS_BLOB_BYTES_MAX} a Redis value may hold",
                self.described,
                bytes.len()
            )));
        }
        if bytes.len() >= REDIS_BLOB_PROBE_BYTES_MIN && self.has_blob(id)? {
            debug!("shared put_blob blob={id} outcome=already-there");
            return self.stamp_blob(id);
        }
        let key = blob_key(id);
        match self.call(&[b"SET", &key, bytes, b"NX"], 0)? {
            Reply::Status(s) if s == "OK" => debug!("shared put_blob blob={id} outcome=stored"),
            Reply::Bulk(None) => debug!("shared put_blob blob={id} outcome=already-there"),
            other => return Err(self.unexpected("SET NX", &key, &other)),
        }
        self.stamp_blob(id)
    }

    /// `GET`, its value copied to `sink` as it arrives (a chunk at a time:
    /// never the whole blob in memory).
    fn get_blob_into(
        &self,
        id: &BlobId,
        max_bytes: u64,
        sink: &mut dyn Write,
        progress: &super::Progress,
    ) -> TierResult<Option<u64>> {
        let key = blob_key(id);
        let max = max_bytes.min(REDIS_BLOB_BYTES_MAX);
        let name = format!("GET {}", key_text(&key));
        let pooled = self.pool().pop();
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let idle = self.transfer_idle();
        let mut answer = conn
            .set_timeouts(idle)
            .and_then(|()| conn.send(&[b"GET", &key]))
            .and_then(|()| read_bulk_into(&mut conn.reader, max, sink, progress));
        if let Err(e) = &answer {
            if reused && progress.bytes() == 0 && is_dead_connection(e) {
                self.pool().clear();
                conn = self.connect()?;
                answer = conn
                    .set_timeouts(idle)
                    .and_then(|()| conn.send(&[b"GET", &key]))
                    .and_then(|()| read_bulk_into(&mut conn.reader, max, sink, progress));
            }
        }
        let answer = answer.and_then(|a| conn.set_timeouts(self.timeout).map(|()| a));
        let answer = answer.map_err(|e| match e.kind() {
            io::ErrorKind::FileTooLarge => {
                TierError::Data(format!("{} blob {id}: {e}", self.described))
            }
            _ => self.tier_error(&name, e),
        })?;
        self.give_back(conn);
        match answer {
            Bulk::Missing => Ok(None),
            Bulk::Copied(len) => Ok(Some(len)),
            Bulk::Error(m) => Err(self.error_reply(&format!("{} {name}", self.described), &m)),
        }
    }

    /// `SET key <value> NX` with the value streamed from `source` (a chunk
    /// at a time); blobs of `REDIS_BLOB_PROBE_BYTES_MIN` or more are first
    /// probed with `EXISTS`.
    fn put_blob_from(
        &self,
        id: &BlobId,
        source: &mut dyn Read,
        len: u64,
        progress: &super::Progress,
    ) -> TierResult<()> {
        if len > REDIS_BLOB_BYTES_MAX {
            return Err(TierError::Refused(format!(
                "{} blob {id}: {len} bytes, over the {REDIS_BLOB_BYTES_MAX} a Redis value may hold",
                self.described
            )));
        }
        if len >= REDIS_BLOB_PROBE_BYTES_MIN as u64 && self.has_blob(id)? {
            debug!("shared put_blob blob={id} outcome=already-there");
            return self.stamp_blob(id);
        }
        let key = blob_key(id);
        let name = format!("SET {} NX", key_text(&key));
        let mut head = Vec::with_capacity(128);
        let _ = write!(head, "*4\r\n$3\r\nSET\r\n${}\r\n", key.len());
        head.extend_from_slice(&key);
        let _ = write!(head, "\r\n${len}\r\n");
        let pooled = self.pool().pop();
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.connect()?,
        };
        if let Err(e) = conn.reader.get_mut().write_all(&head) {
            if !(reused && is_dead_connection(&e)) {
                return Err(self.tier_error(&name, e));
            }
            self.pool().clear();
            conn = self.connect()?;
            conn.reader
                .get_mut()
                .write_all(&head)
                .map_err(|e| self.tier_error(&name, e))?;
        }
        let sent = conn
            .set_timeouts(self.transfer_idle())
            .and_then(|()| super::copy_counted(source, conn.reader.get_mut(), len, progress))
            .and_then(|()| conn.reader.get_mut().write_all(b"\r\n$2\r\nNX\r\n"))
            .and_then(|()| read_reply(&mut conn.reader, 0))
            .and_then(|r| conn.set_timeouts(self.timeout).map(|()| r));
        let reply = sent.map_err(|e| self.tier_error(&name, e))?;
        self.give_back(conn);
        match reply {
            Reply::Status(s) if s == "OK" => debug!("shared put_blob blob={id} outcome=stored"),
            Reply::Bulk(None) => debug!("shared put_blob blob={id} outcome=already-there"),
            Reply::Error(m) => {
                return Err(self.error_reply(&format!("{} {name}", self.described), &m))
            }
            other => return Err(self.unexpected("SET NX", &key, &other)),
        }
        self.stamp_blob(id)
    }

    fn repair_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()> {
        debug_assert_eq!(
            blake3::hash(bytes).as_bytes(),
            &id.0,
            "repair_blob with bytes that are not {id}"
        );
        let key = blob_key(id);
        match self.call(&[b"SET", &key, bytes], 0)? {
            Reply::Status(s) if s == "OK" => Ok(()),
            other => Err(self.unexpected("SET", &key, &other)),
        }
    }

    fn describe(&self) -> String {
        self.described.clone()
    }

    fn replace_damaged(&self, path: &[u8], seen: &Seen, record: &Record) -> TierResult<bool> {
        let key = self.record_key(path);
        let value = record.encode();
        let (kind, bytes): (&[u8], &[u8]) = match seen {
            Seen::Bytes(b) => (b"bytes", b),
            Seen::Oversize => (b"big", b""),
            Seen::WrongType => (b"type", b""),
        };
        let max = RECORD_BYTES_MAX.to_string();
        let reply = self.call(
            &[
                b"EVAL",
                REPLACE_DAMAGED_LUA,
                b"1",
                &key,
                kind,
                bytes,
                &value,
                max.as_bytes(),
            ],
            0,
        )?;
        match reply {
            Reply::Int(1) => {
                self.healed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let lists = self.list_commands(path, record.kind == RecordKind::Dir);
                let cmds: Vec<Vec<&[u8]>> = lists
                    .iter()
                    .map(|(k, m)| vec![b"SADD".as_slice(), k, m])
                    .collect();
                self.pipeline(&cmds, 0)?;
                warn!(
                    "shared replace_damaged path={:?} outcome=replaced",
                    path.escape_ascii().to_string()
                );
                Ok(true)
            }
            Reply::Int(0) => Ok(false),
            other => Err(self.unexpected("EVAL", &key, &other)),
        }
    }

    fn list(&self, path: &[u8], max: usize) -> TierResult<Vec<Listed>> {
        self.list_counted(path, max, &super::Progress::default())
    }

    /// `SSCAN` passes until the cursor comes back to 0 (or `max` names),
    /// each pass counted in `progress`.
    fn list_counted(
        &self,
        path: &[u8],
        max: usize,
        progress: &super::Progress,
    ) -> TierResult<Vec<Listed>> {
        let key = self.list_key(path);
        let count = LIST_SCAN_COUNT.to_string();
        let mut cursor = b"0".to_vec();
        let mut out = Vec::new();
        for _ in 0..LIST_SCAN_PASSES_MAX {
            let reply = self.call(
                &[b"SSCAN", &key, &cursor, b"COUNT", count.as_bytes()],
                LIST_REPLY_BYTES_MAX,
            )?;
            let Reply::Array(Some(parts)) = reply else {
                return Err(self.unexpected("SSCAN", &key, &reply));
            };
            let [Reply::Bulk(Some(next)), Reply::Array(Some(members))] = parts.as_slice() else {
                return Err(self.unexpected("SSCAN", &key, &Reply::Array(Some(parts))));
            };
            progress.check()?;
            for m in members {
                if out.len() >= max {
                    return Ok(out);
                }
                if let Reply::Bulk(Some(m)) = m {
                    progress.add(m.len() as u64 + 2);
                    out.extend(parse_list_member(m));
                }
            }
            progress.add(1);
            if next.as_slice() == b"0" {
                break;
            }
            cursor = next.clone();
        }
        Ok(out)
    }

    fn records_healed(&self) -> u64 {
        self.healed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn scan_records(
        &self,
        namespace: &str,
        cursor: &[u8],
        max: usize,
    ) -> TierResult<super::Page<super::Scanned>> {
        if !super::valid_namespace(namespace) {
            return Err(TierError::Data(format!("namespace {namespace:?}")));
        }
        let prefix = format!("casfs:{namespace}:r:").into_bytes();
        let mut pattern = prefix.clone();
        pattern.push(b'*');
        let used_key = format!("casfs:{namespace}:u").into_bytes();
        let super::Page { items: keys, next } = self.scan_keys(&pattern, cursor, max)?;
        let mut items = Vec::with_capacity(keys.len());
        let parse_score = |r: &Reply| match r {
            Reply::Bulk(Some(t)) => std::str::from_utf8(t)
                .ok()
                .and_then(|t| t.parse::<f64>().ok())
                .map_or(0, |t| t.max(0.0) as u64),
            _ => 0,
        };
        let parse = |key: &[u8], path: Vec<u8>, get: &Reply, score: &Reply| {
            let (seen, record) = match get {
                Reply::Bulk(None) => return Ok(None), // deleted since the SCAN
                Reply::Bulk(Some(b)) => (Seen::Bytes(b.clone()), Record::decode(b).ok()),
                Reply::Error(m) if m.starts_with("WRONGTYPE") => (Seen::WrongType, None),
                Reply::Error(m) => return Err(self.error_reply("GET", m)),
                other => return Err(self.unexpected("GET", key, other)),
            };
            Ok(Some(super::Scanned {
                key: path,
                seen,
                record,
                used_s: parse_score(score),
            }))
        };
        let paths: Vec<Vec<u8>> = keys.iter().map(|k| k[prefix.len()..].to_vec()).collect();
        // The whole page in one round trip; a value over the record bound
        // fails the pipeline, and the page is then read a key at a time.
        let mut cmds: Vec<Vec<&[u8]>> = Vec::with_capacity(2 * keys.len());
        for (key, path) in keys.iter().zip(&paths) {
            cmds.push(vec![b"GET".as_slice(), key]);
            cmds.push(vec![b"ZSCORE".as_slice(), &used_key, path]);
        }
        let whole = if cmds.is_empty() {
            Ok(Vec::new())
        } else {
            self.pipeline(&cmds, RECORD_BYTES_MAX)
        };
        match whole {
            Ok(replies) => {
                for ((key, path), r) in keys.iter().zip(paths).zip(replies.chunks(2)) {
                    items.extend(parse(key, path, &r[0], &r[1])?);
                }
            }
            Err(TierError::Data(_)) => {
                for (key, path) in keys.iter().zip(paths) {
                    match self.pipeline(
                        &[
                            vec![b"GET".as_slice(), key],
                            vec![b"ZSCORE".as_slice(), &used_key, &path],
                        ],
                        RECORD_BYTES_MAX,
                    ) {
                        Ok(r) => items.extend(parse(key, path, &r[0], &r[1])?),
                        Err(TierError::Data(_)) => items.push(super::Scanned {
                            key: path,
                            seen: Seen::Oversize,
                            record: None,
                            used_s: 0,
                        }),
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
        Ok(super::Page { items, next })
    }

    fn delete_record(&self, key: &[u8], seen: &Seen) -> TierResult<bool> {
        let path = key;
        let rkey = self.record_key(path);
        let (kind, bytes): (&[u8], &[u8]) = match seen {
            Seen::Bytes(b) => (b"bytes", b),
            Seen::Oversize => (b"big", b""),
            Seen::WrongType => (b"type", b""),
        };
        let is_dir = matches!(
            seen,
            Seen::Bytes(b) if matches!(Record::decode(b), Ok(Record { kind: RecordKind::Dir, .. }))
        );
        let bound = RECORD_BYTES_MAX.to_string();
        let chain = listing_chain(path, is_dir);
        let mut keys: Vec<Vec<u8>> = vec![rkey.clone(), self.used_key.clone()];
        let mut members: Vec<Vec<u8>> = Vec::new();
        for (parent, name, dir) in &chain {
            keys.push(self.list_key(parent));
            keys.push(self.record_key(parent));
            let mut m = if *dir { b"d/".to_vec() } else { b"f/".to_vec() };
            m.extend_from_slice(name);
            members.push(m);
        }
        let nkeys = keys.len().to_string();
        let mut args: Vec<&[u8]> = vec![b"EVAL", DELETE_RECORD_LUA, nkeys.as_bytes()];
        args.extend(keys.iter().map(Vec::as_slice));
        args.extend([kind, bytes, bound.as_bytes(), path]);
        args.extend(members.iter().map(Vec::as_slice));
        match self.call(&args, 0)? {
            Reply::Int(n) => Ok(n == 1),
            other => Err(self.unexpected("EVAL delete_record", &rkey, &other)),
        }
    }

    fn scan_blobs(&self, cursor: &[u8], max: usize) -> TierResult<super::Page<super::StoredBlob>> {
        let super::Page { items: keys, next } = self.scan_keys(b"casfs:b:*", cursor, max)?;
        let mut items = Vec::with_capacity(keys.len());
        let now = super::now_s().to_string();
        let ids: Vec<(BlobId, String, &Vec<u8>)> = keys
            .iter()
            .filter_map(|key| {
                let id = std::str::from_utf8(&key[b"casfs:b:".len()..])
                    .ok()
                    .and_then(BlobId::from_hex)?;
                Some((id, id.hex(), key))
            })
            .collect();
        let mut cmds: Vec<Vec<&[u8]>> = Vec::with_capacity(2 * ids.len());
        for (_, hex, key) in &ids {
            cmds.push(vec![b"STRLEN".as_slice(), key]);
            cmds.push(vec![b"ZSCORE".as_slice(), b"casfs:bt", hex.as_bytes()]);
        }
        let replies = if cmds.is_empty() {
            Vec::new()
        } else {
            self.pipeline(&cmds, 64)?
        };
        let mut unstamped: Vec<&str> = Vec::new();
        for ((id, hex, _), r) in ids.iter().zip(replies.chunks(2)) {
            let Reply::Int(bytes) = r[0] else { continue };
            let stored_s = match &r[1] {
                Reply::Bulk(Some(t)) => std::str::from_utf8(t)
                    .ok()
                    .and_then(|t| t.parse::<f64>().ok())
                    .map_or(0, |t| t.max(0.0) as u64),
                // A blob from before collection (or an old casfs): its
                // grace starts now.
                _ => {
                    unstamped.push(hex);
                    super::now_s()
                }
            };
            items.push(super::StoredBlob {
                id: *id,
                bytes: bytes.max(0) as u64,
                stored_s,
            });
        }
        if !unstamped.is_empty() {
            let mut args: Vec<&[u8]> = vec![b"ZADD", b"casfs:bt", b"NX"];
            for hex in &unstamped {
                args.push(now.as_bytes());
                args.push(hex.as_bytes());
            }
            self.call(&args, 0)?;
        }
        Ok(super::Page { items, next })
    }

    fn delete_blob(&self, id: &BlobId, stored_before_s: u64) -> TierResult<bool> {
        let key = blob_key(id);
        let before = stored_before_s.to_string();
        match self.call(
            &[
                b"EVAL",
                DELETE_BLOB_LUA,
                b"2",
                &key,
                b"casfs:bt",
                id.hex().as_bytes(),
                before.as_bytes(),
            ],
            0,
        )? {
            Reply::Int(n) => Ok(n == 1),
            other => Err(self.unexpected("EVAL delete_blob", &key, &other)),
        }
    }

    fn note_used(&self, paths: &[Vec<u8>], now_s: u64) -> TierResult<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let keys: Vec<Vec<u8>> = paths.iter().map(|p| self.record_key(p)).collect();
        let nkeys = (keys.len() + 1).to_string();
        let now = now_s.to_string();
        let mut args: Vec<&[u8]> = vec![b"EVAL", NOTE_USED_LUA, nkeys.as_bytes(), &self.used_key];
        args.extend(keys.iter().map(Vec::as_slice));
        args.push(now.as_bytes());
        args.extend(paths.iter().map(Vec::as_slice));
        self.call(&args, 0)?;
        Ok(())
    }

    fn lease(&self, name: &str, holder: &str, ttl_s: u64, now_s: u64) -> TierResult<super::Lease> {
        let key = format!("casfs:lease:{name}").into_bytes();
        let ttl = ttl_s.max(1).to_string();
        let reply = self.call(
            &[
                b"EVAL",
                LEASE_LUA,
                b"1",
                &key,
                holder.as_bytes(),
                ttl.as_bytes(),
            ],
            RECORD_BYTES_MAX,
        )?;
        let Reply::Array(Some(parts)) = &reply else {
            return Err(self.unexpected("EVAL lease", &key, &reply));
        };
        match parts.as_slice() {
            [Reply::Int(1), Reply::Int(ttl)] => Ok(super::Lease::Held {
                until_s: now_s + (*ttl).max(0) as u64,
            }),
            [Reply::Int(0), Reply::Bulk(Some(h)), Reply::Int(ttl)] => Ok(super::Lease::Other {
                holder: String::from_utf8_lossy(h).into_owned(),
                until_s: now_s + (*ttl).max(0) as u64,
            }),
            _ => Err(self.unexpected("EVAL lease", &key, &reply)),
        }
    }

    fn release_lease(&self, name: &str, holder: &str) -> TierResult<()> {
        let key = format!("casfs:lease:{name}").into_bytes();
        self.call(&[b"EVAL", RELEASE_LUA, b"1", &key, holder.as_bytes()], 0)?;
        Ok(())
    }

    fn namespaces(&self) -> TierResult<Vec<String>> {
        match self.call(&[b"SMEMBERS", b"casfs:namespaces"], LIST_REPLY_BYTES_MAX)? {
            Reply::Array(Some(items)) => Ok(items
                .iter()
                .filter_map(|r| match r {
                    Reply::Bulk(Some(n)) => String::from_utf8(n.clone()).ok(),
                    _ => None,
                })
                .filter(|n| super::valid_namespace(n))
                .collect()),
            other => Err(self.unexpected("SMEMBERS", b"casfs:namespaces", &other)),
        }
    }

    fn lists_in_one_round_trip(&self) -> bool {
        true
    }

    /// One pipeline of `SSCAN <listing> 0 COUNT max_each`, one per path:
    /// the first page of each listing, in one round trip.
    fn list_many(&self, paths: &[Vec<u8>], max_each: usize) -> TierResult<Vec<super::Listing>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Vec<u8>> = paths.iter().map(|p| self.list_key(p)).collect();
        let count = max_each.to_string();
        let cmds: Vec<Vec<&[u8]>> = keys
            .iter()
            .map(|k| vec![b"SSCAN".as_slice(), k, b"0", b"COUNT", count.as_bytes()])
            .collect();
        let replies = self.pipeline(&cmds, LIST_REPLY_BYTES_MAX)?;
        let mut out = Vec::with_capacity(replies.len());
        for (reply, key) in replies.into_iter().zip(&keys) {
            let listing = match reply {
                Reply::Array(Some(parts)) => match parts.as_slice() {
                    [Reply::Bulk(Some(cursor)), Reply::Array(Some(members))] => super::Listing {
                        names: members
                            .iter()
                            .filter_map(|m| match m {
                                Reply::Bulk(Some(m)) => parse_list_member(m),
                                _ => None,
                            })
                            .take(max_each)
                            .collect(),
                        // Cursor 0: the scan is complete.
                        whole: cursor.as_slice() == b"0" && members.len() <= max_each,
                    },
                    _ => return Err(self.unexpected("SSCAN", key, &Reply::Array(Some(parts)))),
                },
                // A listing key of another type: nothing usable listed there.
                Reply::Error(m) if m.starts_with("WRONGTYPE") => super::Listing::default(),
                Reply::Error(m) => {
                    return Err(self.error_reply(&format!("{} SSCAN", self.described), &m))
                }
                other => return Err(self.unexpected("SSCAN", key, &other)),
            };
            out.push(listing);
        }
        Ok(out)
    }
}

/// A listing set's member (`f/<name>` or `d/<name>`) as a name; None for
/// anything else (total).
pub(crate) fn parse_list_member(m: &[u8]) -> Option<Listed> {
    let (dir, name) = match m {
        [b'd', b'/', name @ ..] => (true, name),
        [b'f', b'/', name @ ..] => (false, name),
        _ => return None,
    };
    (!name.is_empty()).then(|| Listed {
        name: name.to_vec(),
        dir,
    })
}

/// The command and its key, for errors and logs.
fn command_name(args: &[&[u8]]) -> String {
    let mut name = String::from_utf8_lossy(args[0]).into_owned();
    if let Some(key) = args.get(1).filter(|_| args[0] != b"AUTH") {
        name.push(' ');
        name.push_str(&key_text(key));
    }
    name
}

/// A key as printable text, long ones shortened.
fn key_text(key: &[u8]) -> String {
    let mut text = key.escape_ascii().to_string();
    if text.len() > KEY_TEXT_CHARS_MAX {
        text.truncate(KEY_TEXT_CHARS_MAX);
        text.push_str("...");
    }
    text
}

fn blob_key(id: &BlobId) -> Vec<u8> {
    format!("casfs:b:{}", id.hex()).into_bytes()
}

fn is_dead_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}
