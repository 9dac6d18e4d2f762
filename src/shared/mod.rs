//! The shared tier: how hosts share entries through an engine operators
//! already run. One trait, one implementation per engine (`dir`: a shared
//! POSIX directory such as NFS; `redis`: Redis or Valkey; `mem`: in memory,
//! for tests, with knobs for latency, bandwidth, stalls and refusals).
//! `tier` is how the core uses an engine (callers, deadlines, uploads);
//! `breaker` its circuit breaker and retry pauses, pure; `gc` collection.
//!
//! An engine stores two things, both within one namespace:
//! - *records*: a path below the mount root (`cc/a/e/c8ai…R`) → a `Record`
//!   (a file's blob id, size, mode and mtime, or a directory);
//! - *blobs*: bytes named by their BLAKE3 hash (shared by all namespaces:
//!   the same bytes have the same name everywhere).
//!
//! Invariants every engine keeps:
//! - `put_record(.., create_only = true)` never replaces an existing record:
//!   it reports the one that is there (`Put::Exists`). The directory engine
//!   does this with `link()`, Redis with `SET NX`.
//! - `put_record(.., create_only = false)` replaces atomically (last writer
//!   wins): a reader sees the old record or the new one, never a mix.
//! - `get_blob` returns the bytes as stored, unverified: the caller checks
//!   them against the id before using them (they crossed a network).
//! - No engine call stalls longer than the timeout without progress (Redis:
//!   per read and write; the directory engine relies on the caller's
//!   deadline, see `tier/`, which bounds every call as a whole).
//! - A record that is unreadable (does not parse, is of a newer format, is
//!   over `RECORD_BYTES_MAX`, or is not a string/file at all) is a
//!   `TierError::Data` about that one name, never an engine failure: the
//!   engine answered. A create-only put onto such a record replaces it
//!   (`replace_damaged`, compare-and-set) and reports `Put::Stored`.
//! - Every put of a record also lists its name in its parent's *listing*
//!   and re-asserts every ancestor in its own parent's listing (Redis: in
//!   the same round trip; directory engine: one stat per level). A path
//!   with no record but with a listing reads as a directory record
//!   (`Record::implied_dir`): a host finds a name whose parents' records
//!   were lost, as long as the name's own record or a listing below each
//!   parent survives.
//! - `replace_damaged` replaces only the version the caller saw (Redis: a
//!   Lua compare-and-set; directory engine: rename the name away, check
//!   what was moved, bind the newcomer create-only or put back what was
//!   not ours to replace), and counts what it replaced.
//! - Collection (`gc.rs`) sees records and blobs a bounded page at a
//!   time (`scan_records`, `scan_blobs`, each with an opaque cursor) and
//!   deletes only what it saw: `delete_record` is a compare-and-delete of
//!   the version it scanned (a record republished meanwhile stays), and
//!   `delete_blob` deletes only a blob stored (or re-put) before the time
//!   it is given. Every put of a record and every `note_used` moves the
//!   record's last use forward (never back); every `put_blob`, also of a
//!   blob already there, moves its stored time forward.
//! - A lease (`lease`) is held by at most one holder at a time while it
//!   is unexpired; it is taken over only once it has expired (a holder
//!   that died), and renewed only by its holder.
//! - Key layouts are forever: Redis `casfs:<namespace>:r:<path>`,
//!   `casfs:<namespace>:l:<dir path>` (a set of `f/<name>` and `d/<name>`)
//!   and `casfs:b:<hex>`; directory layout in `dir/mod.rs`.

pub mod breaker;
pub mod dir;
pub mod gc;
pub mod mem;
pub mod redis;
pub mod tier;

use std::fmt;
use std::time::Duration;

use crate::decode::{Damage, Decoded};
use crate::store::ids::BlobId;

/// What a record describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordKind {
    File { blob: BlobId, size: u64, mode: u16 },
    Dir,
}

/// A name in the shared tier, with the mtime its publisher's clock gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub mtime_ns: u64,
}

/// The outcome of `put_record`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Put {
    Stored,
    /// Create-only and a record was already there: this one.
    Exists(Record),
}

/// Why a shared-tier call failed. Three kinds, each handled its own way:
/// an *outage* (`Timeout`, `Unavailable`: the engine did not answer;
/// uploads wait at no cost in attempts, the breaker counts it; a
/// `Protocol` error, an answer we cannot read, counts for the breaker and
/// costs an upload an attempt), a *refusal* (`Refused`: the engine answered no, in its own words;
/// counted against the upload, retried with backoff, reported by `sync`
/// and in the statistics; the breaker stays closed), and a *data error*
/// (`Data`: about one name; a miss). `Busy` is none of these: the call
/// never reached the engine.
#[derive(Debug)]
pub enum TierError {
    /// No answer within the timeout (or no progress within it).
    Timeout,
    /// The engine could not be reached (connection, I/O, a server that is
    /// loading or failing over).
    Unavailable(String),
    /// The engine answered and refused the command for a reason that is
    /// not an outage (Redis `OOM command not allowed` under `maxmemory`
    /// with `noeviction`, `READONLY`, a refused password, a full or
    /// read-only shared directory). The message is the engine's own words.
    Refused(String),
    /// Every caller thread was busy for the whole deadline: local
    /// back-pressure, never counted against the engine.
    Busy,
    /// The engine answered something we cannot read.
    Protocol(String),
    /// The engine answered, but what it holds for one name is unusable
    /// (a record that does not parse, of a newer format, oversize, or of
    /// the wrong type). A miss for that name; never trips the breaker.
    Data(String),
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TierError::Timeout => write!(f, "timed out"),
            TierError::Unavailable(m) => write!(f, "unavailable: {m}"),
            TierError::Refused(m) => write!(f, "refused: {m}"),
            TierError::Busy => write!(
                f,
                "no caller thread free within the deadline (local back-pressure)"
            ),
            TierError::Protocol(m) => write!(f, "protocol error: {m}"),
            TierError::Data(m) => write!(f, "damaged record: {m}"),
        }
    }
}

impl TierError {
    /// An outage: the engine did not answer (waited out by uploads).
    pub fn is_outage(&self) -> bool {
        matches!(self, TierError::Timeout | TierError::Unavailable(_))
    }

    /// What the breaker counts as the engine failing.
    pub fn is_engine_failure(&self) -> bool {
        self.is_outage() || matches!(self, TierError::Protocol(_))
    }
}

pub type TierResult<T> = Result<T, TierError>;

/// Largest record an engine reads.
pub const RECORD_BYTES_MAX: u64 = 4096;
/// Bound on the names one `list` returns: every name of a directory up to
/// this many (sccache's 256 leaves hold about 4,000 each at 1M entries).
pub const LIST_NAMES_MAX: usize = 65_536;

/// What a damaged record was when it was read, so that `replace_damaged`
/// replaces that version and nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// These bytes (a record that does not parse, or one that parses but
    /// whose blob is missing, corrupt or of another size).
    Bytes(Vec<u8>),
    /// A value over `RECORD_BYTES_MAX`.
    Oversize,
    /// Not a record at all (a Redis set or list, a directory).
    WrongType,
}

/// One name in a listing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub name: Vec<u8>,
    pub dir: bool,
}

/// Bytes of blob moved so far in one transfer, watched by the caller that
/// waits for it: a transfer is bounded by its progress (an idle deadline
/// and a floor rate, `tier/`), not by one deadline for the whole call.
/// The waiter sets `cancelled` when it gives up; a streaming engine stops
/// at its next chunk.
#[derive(Default, Debug)]
pub struct Progress {
    bytes: std::sync::atomic::AtomicU64,
    cancelled: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn add(&self, n: u64) {
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// `Err(Timeout)` once the waiter gave up: the engine stops there.
    pub fn check(&self) -> TierResult<()> {
        if self.cancelled.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(TierError::Timeout);
        }
        Ok(())
    }
}

/// The shortest idle deadline of a blob transfer (or listing): the
/// request deadline (`--shared-timeout-ms`, 500 ms by default) is for
/// round trips; a transfer also waits on this host's disk (a staging file
/// written under dirty-page throttling can stall for seconds), so it is
/// given up only after no byte moved for this long, or the deadline if
/// that is longer.
pub const TRANSFER_IDLE_MS_MIN: u64 = 10_000;

/// Bytes one streaming transfer holds in memory at a time (its chunk).
pub const TRANSFER_CHUNK_BYTES: usize = 256 * 1024;

/// Copies `len` bytes from `src` to `sink` in chunks, counting progress
/// and stopping when the waiter gave up. An early end of `src` is an
/// `UnexpectedEof`.
pub fn copy_counted(
    src: &mut dyn std::io::Read,
    sink: &mut dyn std::io::Write,
    len: u64,
    progress: &Progress,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; TRANSFER_CHUNK_BYTES.min(len as usize).max(1)];
    let mut left = len;
    while left > 0 {
        if progress.check().is_err() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the transfer was given up (no progress)",
            ));
        }
        let want = buf.len().min(left as usize);
        let n = src.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        sink.write_all(&buf[..n])?;
        left -= n as u64;
        progress.add(n as u64);
    }
    Ok(())
}

/// A first page of a directory's listing (`Engine::list_many`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub names: Vec<Listed>,
    /// True if these are all the names listed there.
    pub whole: bool,
}

/// A page of what a scan enumerates, and where the next page starts
/// (`None`: that was the last one). Cursors are the engine's own.
#[derive(Clone, Debug, Default)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Vec<u8>>,
}

/// One record as collection sees it.
#[derive(Clone, Debug)]
pub struct Scanned {
    /// The engine's own name for it (`delete_record` takes it back; for
    /// Redis and the in-memory engine its path, for the directory engine
    /// the hash of its path).
    pub key: Vec<u8>,
    /// The version read, for the compare-and-delete.
    pub seen: Seen,
    /// What it says; `None` if it is damaged (collected first).
    pub record: Option<Record>,
    /// Its last use reported by any host (or its last put), Unix seconds;
    /// 0 if unknown (a record from before collection existed).
    pub used_s: u64,
}

/// One blob as collection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    pub id: BlobId,
    pub bytes: u64,
    /// When it was last put (by any host), Unix seconds.
    pub stored_s: u64,
}

/// What `lease` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lease {
    /// The caller holds it until then (Unix seconds).
    Held { until_s: u64 },
    /// Another holder does, until then.
    Other { holder: String, until_s: u64 },
}

/// Bytes an engine spends on one record beside its blob (the record, its
/// listing entry and its last-use entry), for size accounting: measured
/// on Redis (doc/operations.md), rounded up.
pub const RECORD_OVERHEAD_BYTES: u64 = 256;

/// A lease value: `casfs-lease 1 <holder> <until s>` (holder: no spaces).
pub fn encode_lease(holder: &str, until_s: u64) -> Vec<u8> {
    format!("casfs-lease 1 {holder} {until_s}\n").into_bytes()
}

/// Decodes `encode_lease` (total: None for anything else).
pub fn decode_lease(bytes: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(bytes).ok()?.strip_suffix('\n')?;
    let rest = text.strip_prefix("casfs-lease 1 ")?;
    let (holder, until) = rest.rsplit_once(' ')?;
    if holder.is_empty() || holder.contains(' ') {
        return None;
    }
    Some((holder.to_string(), until.parse().ok()?))
}

/// Unix seconds now.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One engine, bound to one namespace.
pub trait Engine: Send + Sync {
    fn get_record(&self, path: &[u8]) -> TierResult<Option<Record>>;
    fn put_record(&self, path: &[u8], record: &Record, create_only: bool) -> TierResult<Put>;
    fn has_blob(&self, id: &BlobId) -> TierResult<bool>;
    /// The stored bytes (unverified), or None; refuses blobs over `max_bytes`.
    fn get_blob(&self, id: &BlobId, max_bytes: u64) -> TierResult<Option<Vec<u8>>>;
    /// Stores bytes under their id; harmless if they are already there or
    /// another host stores them at the same time.
    fn put_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()>;
    /// Replaces a stored blob that failed verification with `bytes`
    /// (which the caller has checked against `id`), atomically.
    fn repair_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()>;
    /// For logs: the engine and where it is, without secrets.
    fn describe(&self) -> String;
    /// Replaces the record at `path` with `record` only if it is still
    /// the damaged version `seen`, atomically. Ok(true): replaced (and
    /// counted); Ok(false): something else is there now.
    fn replace_damaged(&self, path: &[u8], seen: &Seen, record: &Record) -> TierResult<bool>;
    /// Names listed below the directory `path` (at most `max`, in no
    /// particular order). A name may be listed whose record is gone.
    fn list(&self, path: &[u8], max: usize) -> TierResult<Vec<Listed>>;
    /// Damaged records this engine replaced (for statistics).
    fn records_healed(&self) -> u64;
    /// The key `scan_records` gives the record of `path` (for
    /// `delete_record` from a lookup).
    fn record_key(&self, path: &[u8]) -> Vec<u8> {
        path.to_vec()
    }
    /// A page of at most about `max` records of `namespace` from `cursor`
    /// (empty: the start). Every record there for the whole scan is seen
    /// once at least; one put meanwhile may or may not be.
    fn scan_records(&self, namespace: &str, cursor: &[u8], max: usize)
        -> TierResult<Page<Scanned>>;
    /// Deletes the record `key` of this namespace (and its name from its
    /// parent's listing) if it is still the version `seen`, atomically
    /// (Redis: Lua; directory: rename away and check). Ok(true): deleted.
    fn delete_record(&self, key: &[u8], seen: &Seen) -> TierResult<bool>;
    /// A page of at most about `max` blobs from `cursor`.
    fn scan_blobs(&self, cursor: &[u8], max: usize) -> TierResult<Page<StoredBlob>>;
    /// Deletes blob `id` if it was last put before `stored_before_s`.
    /// Ok(true): deleted.
    fn delete_blob(&self, id: &BlobId, stored_before_s: u64) -> TierResult<bool>;
    /// Hosts used these records (of this namespace) at `now_s`: their last
    /// use moves there (never back; the directory engine takes its file
    /// server's now instead). Names with no record are skipped.
    fn note_used(&self, paths: &[Vec<u8>], now_s: u64) -> TierResult<()>;
    /// Takes the lease `name` for `holder` until `now_s + ttl_s` if it is
    /// free, expired, or already `holder`'s (a renewal); else reports who
    /// holds it. Leases are engine-wide (name them by namespace).
    fn lease(&self, name: &str, holder: &str, ttl_s: u64, now_s: u64) -> TierResult<Lease>;
    /// Gives the lease up if `holder` holds it.
    fn release_lease(&self, name: &str, holder: &str) -> TierResult<()>;
    /// The namespaces that hold records (blobs are shared by all of them,
    /// so a blob is unreferenced only if no namespace refers to it).
    fn namespaces(&self) -> TierResult<Vec<String>>;
    /// Removes, a page from `cursor`, listing names whose record is gone
    /// and listings left empty; the count removed and the next cursor.
    /// Engines that do it as records are deleted need not.
    fn sweep_listings(&self, _cursor: &[u8], _max: usize) -> TierResult<(u64, Option<Vec<u8>>)> {
        Ok((0, None))
    }
    /// Streams the stored bytes of blob `id` (unverified: the caller hashes
    /// them as they arrive) into `sink`, at most `max_bytes`, counting them
    /// in `progress`; Ok(None) if the blob is not there, else its length.
    /// The default reads it whole first (engines that stream override it).
    fn get_blob_into(
        &self,
        id: &BlobId,
        max_bytes: u64,
        sink: &mut dyn std::io::Write,
        progress: &Progress,
    ) -> TierResult<Option<u64>> {
        let Some(bytes) = self.get_blob(id, max_bytes)? else {
            return Ok(None);
        };
        copy_counted(&mut &bytes[..], sink, bytes.len() as u64, progress)
            .map_err(|e| TierError::Unavailable(format!("blob {id}: {e}")))?;
        Ok(Some(bytes.len() as u64))
    }
    /// Stores blob `id` from `len` bytes of `source` (which the caller
    /// checked against `id`), counting progress; like `put_blob`. The
    /// default reads it whole first.
    fn put_blob_from(
        &self,
        id: &BlobId,
        source: &mut dyn std::io::Read,
        len: u64,
        progress: &Progress,
    ) -> TierResult<()> {
        let mut bytes = Vec::new();
        copy_counted(source, &mut bytes, len, progress)
            .map_err(|e| TierError::Unavailable(format!("read local blob {id}: {e}")))?;
        self.put_blob(id, &bytes)
    }
    /// Like `list`, counting what arrives in `progress` (a listing of many
    /// names takes many round trips, bounded by its progress like a blob).
    fn list_counted(
        &self,
        path: &[u8],
        max: usize,
        _progress: &Progress,
    ) -> TierResult<Vec<Listed>> {
        self.list(path, max)
    }
    /// True if `list_many` costs one round trip whatever the number of
    /// paths (so prefetching a walk's listings pays off).
    fn lists_in_one_round_trip(&self) -> bool {
        false
    }
    /// The names listed below each of `paths`: a first page of at most
    /// `max_each` each, in one round trip where the engine can
    /// (`lists_in_one_round_trip`), each saying whether it is the whole
    /// listing. For prefetching a walk: what it lists exists; what a whole
    /// listing does not list did not exist when it was read (unless its
    /// listing was lost: see `Record::implied_dir`).
    fn list_many(&self, paths: &[Vec<u8>], max_each: usize) -> TierResult<Vec<Listing>> {
        paths
            .iter()
            .map(|p| {
                let names = self.list(p, max_each + 1)?;
                let whole = names.len() <= max_each;
                Ok(Listing {
                    names: names.into_iter().take(max_each).collect(),
                    whole,
                })
            })
            .collect()
    }
}

/// The parent of a record path and the name in it (`b"a/b/c"` →
/// (`b"a/b"`, `b"c"`); a top-level name's parent is `b""`).
pub fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|c| *c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    }
}

/// Every (parent, name, is_dir) a put of `path` lists: the name itself in
/// its parent, then each ancestor in its own parent, deepest first.
pub fn listing_chain(path: &[u8], is_dir: bool) -> Vec<(&[u8], &[u8], bool)> {
    let mut out = Vec::new();
    let mut cur = path;
    let mut dir = is_dir;
    while !cur.is_empty() {
        let (parent, name) = split_path(cur);
        out.push((parent, name, dir));
        cur = parent;
        dir = true;
    }
    out
}

/// Settings common to all engines.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub namespace: String,
    /// Bound on every call.
    pub timeout: Duration,
    /// umask for files and directories the directory engine creates.
    pub umask: u32,
    /// The engine's password, from `--shared-password-file` (never from
    /// argv); Redis only. A URL may carry one instead, not both.
    pub password: Option<Vec<u8>>,
}

/// `url` with any password in it replaced by `***`, for logs and errors
/// (`redis://user:secret@host` -> `redis://user:***@host`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The last '@' ends the credentials (a password may hold '@' and '/').
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// True if the URL carries a password.
pub fn url_has_password(url: &str) -> bool {
    redact_url(url) != url
}

/// Opens the engine a `--shared` URL names:
/// `file:///ABSOLUTE/PATH` or `redis://[:PASSWORD@]HOST:PORT[/DB]`.
pub fn open(url: &str, config: &EngineConfig) -> Result<Box<dyn Engine>, String> {
    if !valid_namespace(&config.namespace) {
        return Err(format!(
            "namespace {:?} must be 1-64 characters of letters, digits, '.', '_' or '-'",
            config.namespace
        ));
    }
    if let Some(path) = url.strip_prefix("file://") {
        if config.password.is_some() {
            return Err(
                "a password file is for redis:// engines; a shared directory has none".into(),
            );
        }
        if !path.starts_with('/') {
            return Err(format!(
                "shared URL {url:?}: file:// needs an absolute path (file:///srv/cache)"
            ));
        }
        return Ok(Box::new(dir::DirEngine::open(
            std::path::Path::new(path),
            config,
        )?));
    }
    if url.starts_with("redis://") {
        return Ok(Box::new(redis::RedisEngine::open(url, config)?));
    }
    Err(format!(
        "shared URL {:?}: use file:///ABSOLUTE/PATH or redis://HOST:PORT[/DB] (with --shared-password-file)",
        redact_url(url)
    ))
}

pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 64
        && ns
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

impl Record {
    /// What a path with no record but with names listed below it reads
    /// as: a directory whose record was lost (mtime unknown: 0).
    pub fn implied_dir() -> Record {
        Record {
            kind: RecordKind::Dir,
            mtime_ns: 0,
        }
    }

    /// Decodes what an engine holds for one name; anything unusable is a
    /// `TierError::Data` naming `what`.
    pub fn decode_or_data(bytes: &[u8], what: &dyn fmt::Display) -> TierResult<Record> {
        if bytes.len() as u64 > RECORD_BYTES_MAX {
            return Err(TierError::Data(format!(
                "{what}: {} bytes, over the {RECORD_BYTES_MAX} a record may hold",
                bytes.len()
            )));
        }
        Record::decode(bytes).map_err(|d| {
            let head = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
            TierError::Data(format!(
                "{what}: not a casfs record this version reads ({d}; it starts {head:?})"
            ))
        })
    }

    /// A small text format, the same for every engine (readable with `cat`
    /// or `redis-cli GET` when debugging):
    /// `casfs-record 1\nfile <blob hex> <size> <mode octal> <mtime ns>\n` or
    /// `casfs-record 1\ndir <mtime ns>\n`.
    pub fn encode(&self) -> Vec<u8> {
        match &self.kind {
            RecordKind::File { blob, size, mode } => format!(
                "casfs-record 1\nfile {} {size} {mode:o} {}\n",
                blob.hex(),
                self.mtime_ns
            )
            .into_bytes(),
            RecordKind::Dir => format!("casfs-record 1\ndir {}\n", self.mtime_ns).into_bytes(),
        }
    }

    /// Decodes what `encode` writes, and nothing else (total). Only the
    /// canonical form is accepted (no `+`, leading zeros, upper-case hex,
    /// CRLF or trailing lines), so a record that decodes re-encodes to the
    /// same bytes: the compare-and-set of `replace_damaged`, which compares
    /// bytes, sees what a decoded record says.
    pub fn decode(bytes: &[u8]) -> Decoded<Record> {
        let text = std::str::from_utf8(bytes).map_err(|_| Damage::new("not UTF-8 text"))?;
        let body = text
            .strip_prefix("casfs-record 1\n")
            .ok_or_else(|| Damage::new("no `casfs-record 1` first line"))?;
        let line = body
            .strip_suffix('\n')
            .filter(|l| !l.contains('\n'))
            .ok_or_else(|| Damage::new("not exactly one line after the first"))?;
        let number = |field: &str, what: &str| -> Decoded<u64> {
            field
                .parse()
                .map_err(|_| Damage::new(format!("{what} {field:?} is not a number")))
        };
        let fields: Vec<&str> = line.split(' ').collect();
        let record = match fields.as_slice() {
            ["file", hex, size, mode, mtime] => Record {
                kind: RecordKind::File {
                    blob: BlobId::from_hex(hex).ok_or_else(|| {
                        Damage::new(format!("blob id {hex:?} is not 64 hex digits"))
                    })?,
                    size: number(size, "size")?,
                    mode: u16::from_str_radix(mode, 8)
                        .map_err(|_| Damage::new(format!("mode {mode:?} is not 16-bit octal")))?,
                },
                mtime_ns: number(mtime, "mtime")?,
            },
            ["dir", mtime] => Record {
                kind: RecordKind::Dir,
                mtime_ns: number(mtime, "mtime")?,
            },
            [kind, ..] => {
                return Err(Damage::new(format!(
                    "a {kind:?} line of {} fields: neither `file` with 5 nor `dir` with 2",
                    fields.len()
                )))
            }
            [] => return Err(Damage::new("an empty line")),
        };
        if record.encode() != bytes {
            return Err(Damage::new(
                "not in the canonical form casfs writes (signs, leading zeros or upper-case hex)",
            ));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let f = Record {
            kind: RecordKind::File {
                blob: BlobId::of(b"x"),
                size: 12,
                mode: 0o644,
            },
            mtime_ns: 1_700_000_000_000_000_001,
        };
        assert_eq!(Record::decode(&f.encode()), Ok(f));
        let d = Record {
            kind: RecordKind::Dir,
            mtime_ns: 5,
        };
        assert_eq!(Record::decode(&d.encode()), Ok(d));
        assert!(Record::decode(b"casfs-record 2\ndir 5\n").is_err());
        assert!(Record::decode(b"\xff").is_err());
        // Only the canonical form: what `encode` writes.
        for other in [
            "casfs-record 1\ndir +5\n",
            "casfs-record 1\ndir 05\n",
            "casfs-record 1\ndir 5",
            "casfs-record 1\r\ndir 5\r\n",
            "casfs-record 1\ndir 5\nmore\n",
        ] {
            assert!(Record::decode(other.as_bytes()).is_err(), "{other:?}");
        }
        let hex = BlobId::of(b"x").hex();
        let lower = format!("casfs-record 1\nfile {hex} 12 644 5\n");
        assert!(Record::decode(lower.as_bytes()).is_ok());
        let upper = lower.replace(&hex, &hex.to_uppercase());
        assert!(Record::decode(upper.as_bytes()).is_err());
    }

    #[test]
    fn urls_and_namespaces_are_checked() {
        let c = EngineConfig {
            namespace: "default".into(),
            timeout: Duration::from_millis(100),
            umask: 0o002,
            password: None,
        };
        assert!(open("nfs://x", &c).is_err());
        let err = open("nfs://:hunter2@x", &c).err().unwrap();
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(
            redact_url("redis://:hunter2@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://u:p@ss@h"), "redis://u:***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert!(url_has_password("redis://:x@h") && !url_has_password("redis://h"));
        assert!(open("file://relative", &c).is_err());
        assert!(!valid_namespace("a/b"));
        assert!(valid_namespace("debian-13_gcc.14"));
    }
}
