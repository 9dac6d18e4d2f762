//! The metadata store: RocksDB with one column family per kind of record,
//! plus the store directory's identity, format version and single-daemon lock.
//!
//! Store directory layout (names are forever):
//!   casfs-store   marker file naming the format ("casfs store format 1")
//!   lock          held with flock() by the one daemon (or fsck) using the
//!                 store; holds its pid
//!   meta/         RocksDB
//!   blobs/xx/<64 hex>   blob files (see blobs.rs)
//!   staging/<ino>       bytes not yet (or never) published: writes in
//!                       progress and host-local files
//!   quarantine/   blobs that failed verification, kept for inspection
//!   meta.damaged-<UTC time>/  a damaged metadata database as `casfs fsck
//!                 --repair` found it, and what it moved aside (dbrepair.rs);
//!                 the operator's to inspect and remove
//!
//! Invariants:
//! - Every change touching several keys is one `WriteBatch`.
//! - Column family names and key layouts are added, never renamed.
//! - A store with an unknown format version is refused, never "upgraded"
//!   by guessing.
//! - Only a new store (no marker file) gets a new database: an existing
//!   store whose database does not open is refused as damaged
//!   (`OpenError::Damaged`, with the `casfs fsck --repair` that mends it),
//!   never started afresh over its old files (RocksDB would delete them).
//! - `lock` also holds `casfs fsck`, and is held across a repair of the
//!   database (`open_locked` hands it back when an open fails).

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};

use crate::classes::Class;
use crate::decode::{exact, shown, Damage, Decoded, Reader};
use crate::error::{Error, Result};
use crate::stats::StoreGauges;
use crate::store::clock::wall_ns;
use crate::store::dbrepair::DbDamage;
use crate::store::ids::{BlobId, Ino};
use crate::store::space;
use crate::store::touches::Touches;

/// The on-disk format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
const MARKER: &str = "casfs-store";

/// Every column family, declared once. Retired ones stay listed.
#[derive(Clone, Copy, Debug)]
pub enum Cf {
    /// Store-wide values: format version, the inode-number lease.
    Meta,
    /// Ino -> inode record.
    Inodes,
    /// parent Ino ++ name -> child Ino.
    Dentries,
    /// BlobId -> blob size: blobs that metadata knows are stored.
    Blobs,
    /// BlobId ++ Ino -> (): which inodes reference which blob.
    BlobRefs,
    /// Ino -> reason: inodes to clean up after a crash (not yet bound, or
    /// bound while their bytes were still being written).
    Pending,
    /// Store gauges (blobs, bytes stored, logical bytes), one key each,
    /// changed only by adding deltas through the `add` merge operator, so
    /// concurrent batches never read-modify-write them.
    Counters,
    /// The clock's persisted lease.
    Clock,
    /// seq (u64 big-endian, the publication's clock tick) ++ shared path ->
    /// `PendingUpload`: publications not yet acknowledged by the shared
    /// tier, written in the publication's own batch, deleted on delivery
    /// (or when given up). Key order is publication order. Added after
    /// format 1 shipped: older stores get it (empty) when opened.
    Uploads,
}

const CFS: [(Cf, &str); 9] = [
    (Cf::Meta, "meta"),
    (Cf::Inodes, "inodes"),
    (Cf::Dentries, "dentries"),
    (Cf::Blobs, "blobs"),
    (Cf::BlobRefs, "blob_refs"),
    (Cf::Pending, "pending"),
    (Cf::Counters, "counters"),
    (Cf::Clock, "clock"),
    (Cf::Uploads, "uploads"),
];

const KEY_FORMAT: &[u8] = b"format_version";
/// Inode numbers below this value may have been handed out: a lease, raised
/// (before any number above the old one is used) in steps of `INO_LEASE`.
pub(crate) const KEY_NEXT_INO: &[u8] = b"next_ino";
const KEY_LEASE: &[u8] = b"lease_ns";
/// Written (empty) with sync to make the log durable (`sync_log`).
const KEY_SYNC_MARKER: &[u8] = b"sync_marker";
/// Retired: the three gauges in one record, rewritten by every batch.
/// Converted to the keys below when a store is opened.
const KEY_GAUGES_RETIRED: &[u8] = b"gauges";
const KEY_GAUGE_BLOBS: &[u8] = b"gauge_blobs";
const KEY_GAUGE_BYTES_STORED: &[u8] = b"gauge_bytes_stored";
const KEY_GAUGE_BYTES_LOGICAL: &[u8] = b"gauge_bytes_logical";
/// How many inode numbers one lease covers.
pub const INO_LEASE: u64 = 1 << 16;

/// What a gauge holds once a value or delta that does not decode was merged
/// into it: never 8 bytes, so every later read reports the gauge damaged
/// (`gauge_value`) until `casfs fsck --repair` resets it.
const GAUGE_DAMAGED: &[u8] = b"damaged";

/// The counters' merge operator: values and operands are i64 little-endian
/// deltas, and the value is their sum (a gauge never goes below zero).
///
/// Invariant: it never fails (a failed merge is a RocksDB corruption error
/// that stops compactions, and with them every write) and never drops a
/// delta silently: if the value or an operand does not decode, the result
/// is `GAUGE_DAMAGED`, which stays so under later merges.
fn add_merge(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    Some(merge_gauge(existing, operands.iter()))
}

/// The merge itself, on plain slices (so that it can be tested).
pub(crate) fn merge_gauge<'a>(
    existing: Option<&[u8]>,
    operands: impl Iterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let mut sum = match existing.map(gauge_value) {
        None => 0,
        Some(Ok(v)) => v,
        Some(Err(_)) => return GAUGE_DAMAGED.to_vec(),
    };
    for op in operands {
        match gauge_value(op) {
            Ok(delta) => sum = sum.wrapping_add(delta),
            Err(_) => return GAUGE_DAMAGED.to_vec(),
        }
    }
    sum.to_le_bytes().to_vec()
}

/// A gauge's value or delta: an i64, 8 bytes little-endian.
pub fn gauge_value(v: &[u8]) -> Decoded<i64> {
    if v == GAUGE_DAMAGED {
        return Err(Damage::new(
            "marked damaged (a value or delta that did not decode was merged into it)",
        ));
    }
    Ok(i64::from_le_bytes(exact(v, "a gauge")?))
}

/// What kind of object an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// Host-local special files (`mknod`, `mkfifo`, a bound Unix socket):
    /// metadata only, never shared or published; the kernel does the rest
    /// (a fifo's pipe, a socket's peer, a device's driver). Their device
    /// number is in `Content::Device`.
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// Where a file's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Directories.
    None,
    /// In `staging/<ino>`: being written, or a host-local file.
    Staged,
    /// A published, immutable blob.
    Blob(BlobId),
    /// A symlink's target.
    Symlink(Vec<u8>),
    /// A special file's device number (`rdev`; 0 for fifos and sockets).
    Device(u32),
}

/// One inode record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: Ino,
    pub kind: Kind,
    pub class: Class,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub mtime_ns: u64,
    /// None: the access time is the mtime (the daemon does not track reads);
    /// Some: a client set it (`touch -a`, `utimensat` with explicit times).
    pub atime_ns: Option<u64>,
    pub ctime_ns: u64,
    /// The mtime is one a client set (`utimensat` with a time: `cp -a`,
    /// `touch -t`, `tar x`) and the content has not changed since: a
    /// publication keeps it instead of stamping the clock's now. Every time
    /// the daemon stamps (`stamp`) clears it.
    pub mtime_set: bool,
    /// The directory holding the name this inode was last bound to (for a
    /// directory: its parent). Used for class paths and repair.
    pub parent: Ino,
    pub name: Vec<u8>,
    /// A file's other names (hard links), besides `parent`/`name`; a bound
    /// file's `nlink` is one more than their count.
    pub links: Vec<(Ino, Vec<u8>)>,
    pub content: Content,
}

/// Why an inode is in the pending table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingReason {
    /// Created but not bound to a name yet (waiting for close), or unlinked
    /// while still open: delete it at startup.
    Unbound = 1,
    /// Bound to a shared name while its bytes are still being written:
    /// unbind and delete it at startup (never expose half-written bytes).
    Unsealed = 2,
}

/// Tags of the optional fields of an inode record: the access time, and
/// each other name of a hard-linked file (repeated).
const TAG_ATIME: u8 = 1;
const TAG_LINK: u8 = 2;
/// `mtime_set` (no value: present means true).
const TAG_MTIME_SET: u8 = 3;

impl Inode {
    /// The content changed now: mtime and ctime are the daemon's clock, and
    /// a time a client set before no longer stands.
    pub fn stamp(&mut self, now: u64) {
        self.mtime_ns = now;
        self.ctime_ns = now;
        self.mtime_set = false;
    }

    /// Every name the inode is bound to (for a bound inode).
    pub fn names(&self) -> Vec<(Ino, Vec<u8>)> {
        let mut all = vec![(self.parent, self.name.clone())];
        all.extend(self.links.iter().cloned());
        all
    }

    /// Forgets one of the names (the caller deletes its entry): another name
    /// becomes the main one if it was that.
    pub fn drop_name(&mut self, parent: Ino, name: &[u8]) {
        if self.parent == parent && self.name == name {
            if let Some((p, n)) = self.links.pop() {
                self.parent = p;
                self.name = n;
            }
        } else {
            self.links.retain(|(p, n)| !(*p == parent && n == name));
        }
    }

    /// Records that the name `from` is now `to` (a rename).
    pub fn move_name(&mut self, from: (Ino, &[u8]), to: (Ino, &[u8])) {
        if let Some(l) = self
            .links
            .iter_mut()
            .find(|(p, n)| *p == from.0 && n == from.1)
        {
            *l = (to.0, to.1.to_vec());
            return;
        }
        self.parent = to.0;
        self.name = to.1.to_vec();
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.name.len());
        b.push(1); // record version
        b.push(match self.kind {
            Kind::Dir => 1,
            Kind::File => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDevice => 6,
            Kind::BlockDevice => 7,
        });
        b.push(self.class.code());
        b.extend_from_slice(&self.perm.to_le_bytes());
        b.extend_from_slice(&self.uid.to_le_bytes());
        b.extend_from_slice(&self.gid.to_le_bytes());
        b.extend_from_slice(&self.nlink.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.mtime_ns.to_le_bytes());
        b.extend_from_slice(&self.ctime_ns.to_le_bytes());
        b.extend_from_slice(&self.parent.0.to_le_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(&self.name);
        match &self.content {
            Content::None => b.push(0),
            Content::Staged => b.push(1),
            Content::Blob(id) => {
                b.push(2);
                b.extend_from_slice(&id.0);
            }
            Content::Symlink(t) => {
                b.push(3);
                b.extend_from_slice(&(t.len() as u16).to_le_bytes());
                b.extend_from_slice(t);
            }
            Content::Device(rdev) => {
                b.push(4);
                b.extend_from_slice(&rdev.to_le_bytes());
            }
        }
        // Optional fields after the content, each a tag byte and its value;
        // a record without them is the shorter record of earlier versions.
        if let Some(atime) = self.atime_ns {
            b.push(TAG_ATIME);
            b.extend_from_slice(&atime.to_le_bytes());
        }
        if self.mtime_set {
            b.push(TAG_MTIME_SET);
        }
        for (parent, name) in &self.links {
            b.push(TAG_LINK);
            b.extend_from_slice(&parent.0.to_le_bytes());
            b.extend_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name);
        }
        b
    }

    /// Decodes an inode record (total: any bytes give a record or `Damage`).
    pub fn decode(ino: Ino, b: &[u8]) -> Decoded<Inode> {
        let mut r = Reader::new(b);
        match r.u8("the record version")? {
            1 => {}
            v => {
                return Err(Damage::new(format!(
                    "record version {v}, this casfs reads 1"
                )))
            }
        }
        let kind = match r.u8("the kind")? {
            1 => Kind::Dir,
            2 => Kind::File,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDevice,
            7 => Kind::BlockDevice,
            k => return Err(Damage::new(format!("unknown kind {k}"))),
        };
        let code = r.u8("the class")?;
        let class =
            Class::from_code(code).ok_or_else(|| Damage::new(format!("unknown class {code}")))?;
        let perm = r.u16_le("the mode")?;
        let uid = r.u32_le("the uid")?;
        let gid = r.u32_le("the gid")?;
        let nlink = r.u32_le("the link count")?;
        let size = r.u64_le("the size")?;
        let mtime_ns = r.u64_le("the mtime")?;
        let ctime_ns = r.u64_le("the ctime")?;
        let parent = Ino(r.u64_le("the parent")?);
        let name_len = r.u16_le("the name length")? as usize;
        let name = r.take(name_len, "the name")?.to_vec();
        let content = match r.u8("the content tag")? {
            0 => Content::None,
            1 => Content::Staged,
            2 => Content::Blob(BlobId(r.array("the blob id")?)),
            3 => {
                let n = r.u16_le("the symlink target length")? as usize;
                Content::Symlink(r.take(n, "the symlink target")?.to_vec())
            }
            4 => Content::Device(r.u32_le("the device number")?),
            t => return Err(Damage::new(format!("unknown content tag {t}"))),
        };
        let mut atime_ns = None;
        let mut mtime_set = false;
        let mut links = Vec::new();
        loop {
            let at = r.at();
            let Some(tag) = r.next_u8() else { break };
            match tag {
                TAG_ATIME => atime_ns = Some(r.u64_le("the atime")?),
                TAG_MTIME_SET => mtime_set = true,
                TAG_LINK => {
                    let parent = Ino(r.u64_le("a link's parent")?);
                    let n = r.u16_le("a link's name length")? as usize;
                    links.push((parent, r.take(n, "a link's name")?.to_vec()));
                }
                t => {
                    return Err(Damage::new(format!(
                        "unknown optional field tag {t} at byte {at}"
                    )))
                }
            }
        }
        Ok(Inode {
            ino,
            kind,
            class,
            perm,
            uid,
            gid,
            nlink,
            size,
            mtime_ns,
            atime_ns,
            ctime_ns,
            mtime_set,
            parent,
            name,
            links,
            content,
        })
    }
}

/// A publication waiting to be delivered to the shared tier (`Cf::Uploads`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingUpload {
    /// The publication's clock tick: unique, and increasing in publication
    /// order across restarts (the clock restarts above its lease).
    pub seq: u64,
    /// The name's path below the mount root, `/`-separated.
    pub path: Vec<u8>,
    pub create_only: bool,
    pub blob: BlobId,
    pub size: u64,
    pub mode: u16,
    pub mtime_ns: u64,
}

impl PendingUpload {
    pub(crate) fn key(&self) -> Vec<u8> {
        upload_key(self.seq, &self.path)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(52);
        b.push(1); // record version
        b.push(self.create_only as u8);
        b.extend_from_slice(&self.blob.0);
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.mode.to_le_bytes());
        b.extend_from_slice(&self.mtime_ns.to_le_bytes());
        b
    }

    /// Decodes a record of `Cf::Uploads` from its key and value (total).
    pub(crate) fn decode(key: &[u8], v: &[u8]) -> Decoded<PendingUpload> {
        let (seq, path) = split_upload_key(key)?;
        let mut r = Reader::new(v);
        match r.u8("the record version")? {
            1 => {}
            v => {
                return Err(Damage::new(format!(
                    "record version {v}, this casfs reads 1"
                )))
            }
        }
        let create_only = match r.u8("the create-only flag")? {
            0 => false,
            1 => true,
            f => return Err(Damage::new(format!("create-only flag {f}, not 0 or 1"))),
        };
        let blob = BlobId(r.array("the blob id")?);
        let size = r.u64_le("the size")?;
        let mode = r.u16_le("the mode")?;
        let mtime_ns = r.u64_le("the mtime")?;
        r.finish("the mtime")?;
        Ok(PendingUpload {
            seq,
            path: path.to_vec(),
            create_only,
            blob,
            size,
            mode,
            mtime_ns,
        })
    }
}

fn upload_key(seq: u64, path: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + path.len());
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(path);
    k
}

/// An upload key: the publication's tick (8 bytes, big-endian) and the
/// shared path (not empty).
pub(crate) fn split_upload_key(key: &[u8]) -> Decoded<(u64, &[u8])> {
    if key.len() <= 8 {
        return Err(Damage::new(format!(
            "key of {} bytes: a tick (8) and a path (at least 1)",
            key.len()
        )));
    }
    let (seq, path) = key.split_at(8);
    Ok((u64::from_be_bytes(exact(seq, "a tick")?), path))
}

fn dentry_key(parent: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&parent.key());
    k.extend_from_slice(name);
    k
}

fn blob_ref_key(id: &BlobId, ino: Ino) -> Vec<u8> {
    let mut k = Vec::with_capacity(40);
    k.extend_from_slice(&id.0);
    k.extend_from_slice(&ino.key());
    k
}

/// A directory entry's key: the parent and the (non-empty) name.
pub fn split_dentry_key(key: &[u8]) -> Decoded<(Ino, &[u8])> {
    if key.len() <= 8 {
        return Err(Damage::new(format!(
            "key of {} bytes: a parent (8) and a name (at least 1)",
            key.len()
        )));
    }
    let (parent, name) = key.split_at(8);
    Ok((Ino::from_key(parent)?, name))
}

/// A blob reference's key: the blob id and the referencing inode.
pub fn split_blob_ref_key(key: &[u8]) -> Decoded<(BlobId, Ino)> {
    let k: [u8; 40] = exact(key, "a blob reference key (blob id and inode)")?;
    let (id, ino) = k.split_at(32);
    Ok((BlobId(exact(id, "a blob id")?), Ino::from_key(ino)?))
}

/// A key of `Cf::Blobs`: a blob id.
pub fn blob_key_id(key: &[u8]) -> Decoded<BlobId> {
    Ok(BlobId(exact(key, "a blob id")?))
}

/// A fixed-width value: a u64, 8 bytes little-endian (blob sizes, leases).
pub fn u64_value(v: &[u8]) -> Decoded<u64> {
    Ok(u64::from_le_bytes(exact(v, "a u64 value")?))
}

impl PendingReason {
    /// A pending record's value: one byte, the reason.
    pub fn decode(v: &[u8]) -> Decoded<PendingReason> {
        match v {
            [1] => Ok(PendingReason::Unbound),
            [2] => Ok(PendingReason::Unsealed),
            _ => Err(Damage::new(format!(
                "reason {:?}: not one byte 1 (unbound) or 2 (unsealed)",
                crate::decode::shown(v)
            ))),
        }
    }
}

/// Leases above this are damage, not time or numbers in use: the clock's
/// and the allocator's arithmetic (`+ LEASE_NS`, `+ INO_LEASE`) must not
/// overflow, and nanoseconds past i64 (the year 2262) are no time a file
/// system shows.
const LEASE_MAX: u64 = i64::MAX as u64;

/// A lease value (`KEY_NEXT_INO`, `KEY_LEASE`): a u64 up to `LEASE_MAX`.
pub fn lease_value(v: &[u8]) -> Decoded<u64> {
    match u64_value(v)? {
        n if n > LEASE_MAX => Err(Damage::new(format!(
            "lease {n} is over {LEASE_MAX}, the largest a lease may be"
        ))),
        n => Ok(n),
    }
}

/// How often, at most, a stopped database is reopened while its last
/// reopen failed (each attempt replays the log and may flush it).
const REOPEN_INTERVAL_NS: u64 = 1_000_000_000;

thread_local! {
    /// True while this thread holds the database (`Db`).
    static DB_HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// An open store: the RocksDB handle and the lock that makes it ours.
///
/// Invariants:
/// - A thread holds the database (`Db`, a shared hold of `db`) for one call
///   at a time and makes no other store call while it holds it (asserted),
///   so `recover`, which takes `db` exclusively to reopen it, only ever
///   waits for calls in flight on other threads, each of which ends
///   without waiting for anything.
/// - RocksDB keeps the error of a failed write (a full disk): every later
///   write fails with it, for good, until the database is resumed (not in
///   RocksDB's C API) or reopened. So once a write failed (`broken`), no
///   write reaches RocksDB again before `recover` has reopened it, which it
///   does only once the filesystem has room above its reserve again; until
///   then writes get ENOSPC at once and reads go on. Reopening replays the
///   log, so every write that returned Ok before the failure is kept.
pub struct Store {
    pub root: PathBuf,
    /// `None` only after a reopen failed (the next call tries again).
    db: RwLock<Option<DB>>,
    /// Reopens so far; a write failure of the database before the last
    /// reopen is not one of the current database.
    generation: AtomicU64,
    broken: AtomicBool,
    /// The current disk-full episode; also serializes `recover`.
    episode: Mutex<Episode>,
    lock: StoreLock,
    /// Damaged records already logged (`Store::damaged`).
    damage_logged: Mutex<DamageLog>,
    /// Touches not yet written; applied to every inode read (`touches.rs`).
    pub touches: Touches,
}

/// Bound on the damaged records logged one by one; past it, one line says
/// that more were found.
const DAMAGE_LOG_KEYS_MAX: usize = 1024;

/// Which damaged records were logged, so each is logged once.
#[derive(Default)]
struct DamageLog {
    keys: HashSet<(usize, Vec<u8>)>,
    overflowed: bool,
}

/// One episode of a stopped database, for `recover` and the log.
#[derive(Default)]
struct Episode {
    since_ns: u64,
    /// The errno writes get while the database waits to be reopened.
    errno: i32,
    last_reopen_ns: u64,
    reopen_failed_logged: bool,
}

/// One call's shared hold on the open database (see `Store`).
struct Db<'a> {
    guard: RwLockReadGuard<'a, Option<DB>>,
    generation: u64,
}

impl std::ops::Deref for Db<'_> {
    type Target = DB;
    fn deref(&self) -> &DB {
        self.guard
            .as_ref()
            .expect("a Db is made only of an open database")
    }
}

impl Drop for Db<'_> {
    fn drop(&mut self) {
        DB_HELD.with(|h| h.set(false));
    }
}

fn assert_db_not_held() {
    assert!(
        !DB_HELD.with(|h| h.get()),
        "a store call while this thread holds the database (recover could wait on it forever)"
    );
}

/// The RocksDB options every open of the store's database uses (and
/// RocksDB's own repair: `crate::store::dbrepair`).
pub(crate) fn db_options(create: bool) -> Options {
    let mut opts = Options::default();
    // Only a new store creates its database: for an existing one, a missing
    // `CURRENT` is damage to report, never a reason to start an empty
    // database over the old tables (RocksDB would then delete them).
    opts.create_if_missing(create);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_keep_log_file_num(4);
    opts.set_max_total_wal_size(64 << 20);
    opts
}

/// The options of one column family.
fn cf_options(cf: Cf) -> Options {
    let mut o = Options::default();
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    if matches!(cf, Cf::Counters) {
        o.set_merge_operator_associative(GAUGE_MERGE_NAME, add_merge);
    }
    o
}

/// The name the gauges' merge operator is registered under.
const GAUGE_MERGE_NAME: &str = "casfs_add_i64";

/// Options for RocksDB's repair, which recreates the column families it
/// finds with one set of options: the gauges' merge operator on all of them
/// (only `counters` holds merge records, and its log records cannot be
/// turned into tables without it).
pub(crate) fn repair_options() -> Options {
    let mut opts = db_options(false);
    opts.set_merge_operator_associative(GAUGE_MERGE_NAME, add_merge);
    opts
}

/// How a store's database is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpenMode {
    /// `casfs fsck` without `--repair`: nothing is written (RocksDB adds to
    /// its own info log, `meta/LOG`, and that is all). A store whose
    /// database lacks a column family this casfs added since (it was never
    /// opened by this casfs) is opened for writing instead, as a mount
    /// would, which adds the missing column families, empty.
    ReadOnly,
    /// A mount, or fsck with `--repair`.
    Existing,
    /// After a repair of the database: also writes the format record if
    /// it is missing (the marker file says which format the store has).
    Repaired,
    /// A new store, or fresh metadata after `dbrepair` moved the old aside:
    /// creates the database.
    Create,
}

/// Opens the RocksDB database of the store at `root`.
fn open_db(root: &Path, mode: OpenMode) -> std::result::Result<DB, rocksdb::Error> {
    let cfs = || {
        CFS.iter()
            .map(|(cf, name)| ColumnFamilyDescriptor::new(*name, cf_options(*cf)))
    };
    let opts = db_options(mode == OpenMode::Create);
    if mode == OpenMode::ReadOnly {
        match DB::open_cf_descriptors_read_only(&opts, meta_dir(root), cfs(), false) {
            Err(e)
                if e.kind() == rocksdb::ErrorKind::InvalidArgument
                    && e.as_ref().contains("olumn famil") => {}
            other => return other,
        }
    }
    DB::open_cf_descriptors(&opts, meta_dir(root), cfs())
}

/// The metadata database's directory.
pub fn meta_dir(root: &Path) -> PathBuf {
    root.join("meta")
}

/// Why a store did not open.
#[derive(Debug)]
pub enum OpenError {
    /// Its metadata database is damaged; `casfs fsck --store DIR --repair`
    /// can bring it back (see `dbrepair`).
    Damaged(Box<DbDamage>),
    /// Anything else: a message for an operator (what is wrong, what to do).
    Other(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Other(m) => f.write_str(m),
            OpenError::Damaged(d) => f.write_str(&d.mount_message()),
        }
    }
}

impl From<String> for OpenError {
    fn from(m: String) -> OpenError {
        OpenError::Other(m)
    }
}

/// Opens (creating if new) the store at `root`. Errors are messages for an
/// operator: what is wrong and what to do.
pub fn open_store(root: &Path) -> std::result::Result<Store, String> {
    open_store_checked(root).map_err(|e| e.to_string())
}

/// `open_store`, telling a damaged metadata database from other failures.
pub fn open_store_checked(root: &Path) -> std::result::Result<Store, OpenError> {
    let (lock, is_new) = lock_store_dir(root)?;
    let mode = if is_new {
        OpenMode::Create
    } else {
        OpenMode::Existing
    };
    open_locked(root, lock, mode).map_err(|(e, _lock)| e)
}

/// Checks the store directory at `root` (creating it if new) and takes its
/// lock; true if the store is new (no marker yet).
pub fn lock_store_dir(root: &Path) -> std::result::Result<(StoreLock, bool), String> {
    if root.exists() && !root.is_dir() {
        return Err(format!("store {} is not a directory", root.display()));
    }
    fs::create_dir_all(root)
        .map_err(|e| format!("cannot create store directory {}: {e}", root.display()))?;
    let marker = root.join(MARKER);
    let is_new = !marker.exists();
    if is_new {
        let foreign: Vec<String> = fs::read_dir(root)
            .map_err(|e| format!("cannot read store directory {}: {e}", root.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lock")
            .take(3)
            .collect();
        if !foreign.is_empty() {
            return Err(format!(
                "{} is not a casfs store (it has no {MARKER} file and contains {}); \
                 choose an empty or new directory for --store",
                root.display(),
                foreign.join(", ")
            ));
        }
    }
    let lock = lock_store(root)?;
    if is_new {
        for dir in ["blobs", "staging", "quarantine"] {
            fs::create_dir_all(root.join(dir))
                .map_err(|e| format!("cannot create {}: {e}", root.join(dir).display()))?;
        }
        for shard in 0..256 {
            let d = root.join("blobs").join(format!("{shard:02x}"));
            fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
    } else {
        let text = fs::read_to_string(&marker)
            .map_err(|e| format!("cannot read {}: {e}", marker.display()))?;
        let version = text
            .trim()
            .strip_prefix("casfs store format ")
            .and_then(|v| v.parse::<u32>().ok());
        match version {
            Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "store {} has format {v}, but this casfs reads format {FORMAT_VERSION}; \
                     use a casfs release that reads format {v}, or a new store",
                    root.display()
                ))
            }
            None => {
                return Err(format!(
                    "store {}: {} is damaged ({text:?})",
                    root.display(),
                    marker.display()
                ))
            }
        }
    }
    Ok((lock, is_new))
}

/// Opens the database of a store whose lock is held (`lock_store_dir`);
/// on failure the lock is handed back, so that fsck can repair the
/// database and try again without letting a daemon in meanwhile.
pub(crate) fn open_locked(
    root: &Path,
    lock: StoreLock,
    mode: OpenMode,
) -> std::result::Result<Store, (OpenError, StoreLock)> {
    // RocksDB (through the crate) would create a missing directory, and
    // cannot open one that is a file: either is damage to report as such.
    if mode != OpenMode::Create && !meta_dir(root).is_dir() {
        return Err((OpenError::Damaged(Box::new(DbDamage::of_files(root))), lock));
    }
    let db = match open_db(root, mode) {
        Ok(db) => db,
        Err(e) => {
            let err = match DbDamage::of_open_error(root, &e) {
                Some(d) => OpenError::Damaged(Box::new(d)),
                None => OpenError::Other(format!(
                    "cannot open metadata of store {}: {e}",
                    root.display()
                )),
            };
            return Err((err, lock));
        }
    };
    let store = Store {
        root: root.to_path_buf(),
        db: RwLock::new(Some(db)),
        generation: AtomicU64::new(0),
        broken: AtomicBool::new(false),
        episode: Mutex::new(Episode::default()),
        lock,
        damage_logged: Mutex::new(DamageLog::default()),
        touches: Touches::default(),
    };
    match store.check_format(mode) {
        Ok(()) => Ok(store),
        Err(e) => Err((e, store.close())),
    }
}

fn write_marker(marker: &Path) -> std::result::Result<(), String> {
    let tmp = marker.with_extension("new");
    let mut f = File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    writeln!(f, "casfs store format {FORMAT_VERSION}").map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    fs::rename(&tmp, marker).map_err(|e| format!("cannot write {}: {e}", marker.display()))
}

/// The store's exclusive lock: `flock()` on `lock`, held by the one daemon
/// or `casfs fsck` using the store, with the time it was taken.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
    /// The lock file's ctime right after this process wrote its pid into
    /// it: a time on the store filesystem's own clock (the clock that
    /// stamps blob files' ctimes), taken before this process linked any
    /// blob file (see `Store::opened_at`).
    taken_at: FileTime,
}

/// A time as the store's filesystem keeps it (seconds, nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileTime(pub i64, pub i64);

impl FileTime {
    pub fn ctime_of(m: &fs::Metadata) -> FileTime {
        use std::os::unix::fs::MetadataExt;
        FileTime(m.ctime(), m.ctime_nsec())
    }
}

/// Takes the store's exclusive lock, or says who holds it.
fn lock_store(root: &Path) -> std::result::Result<StoreLock, String> {
    let path = root.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a valid, owned descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        return Err(format!(
            "store {} is in use by another casfs daemon (pid {}); unmount that one first, or use another --store",
            root.display(),
            holder.trim()
        ));
    }
    f.set_len(0).map_err(|e| e.to_string())?;
    write!(f, "{}", std::process::id()).map_err(|e| e.to_string())?;
    let m = f
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    Ok(StoreLock {
        _file: f,
        taken_at: FileTime::ctime_of(&m),
    })
}

impl Store {
    fn cf(db: &DB, cf: Cf) -> &ColumnFamily {
        let name = CFS[cf as usize].1;
        db.cf_handle(name)
            .expect("every column family is created at open")
    }

    /// Checks the format version recorded in the metadata, converts what
    /// an older store needs converted (not when read-only). Records the
    /// version if it is missing in a new store, or one whose database was
    /// repaired or started afresh (the marker file says which format the
    /// store has).
    fn check_format(&self, mode: OpenMode) -> std::result::Result<(), OpenError> {
        let write_missing = matches!(mode, OpenMode::Create | OpenMode::Repaired);
        let read = {
            let db = self.db().map_err(|e| OpenError::Other(e.to_string()))?;
            db.get_cf(Store::cf(&db, Cf::Meta), KEY_FORMAT)
        };
        let recorded = read.map_err(|e| match DbDamage::of_read_error(&self.root, &e) {
            Some(d) => OpenError::Damaged(Box::new(d)),
            None => OpenError::Other(Error::db(e, "read format version").to_string()),
        })?;
        match recorded {
            None if write_missing => {
                self.write("write format version", |db| {
                    db.put_cf(
                        Store::cf(db, Cf::Meta),
                        KEY_FORMAT,
                        FORMAT_VERSION.to_le_bytes(),
                    )?;
                    db.flush_wal(true)
                })
                .map_err(|e| OpenError::Other(e.to_string()))?;
                write_marker(&self.root.join(MARKER))?;
            }
            None => {
                return Err(OpenError::Damaged(Box::new(
                    DbDamage::format_record_missing(&self.root),
                )))
            }
            Some(v) if v.as_slice() == FORMAT_VERSION.to_le_bytes() => {}
            Some(v) => {
                return Err(OpenError::Other(format!(
                    "store {} metadata has unknown format {v:?}",
                    self.root.display()
                )))
            }
        }
        if mode != OpenMode::ReadOnly {
            self.convert_retired_gauges()?;
        }
        Ok(())
    }

    /// Closes the database and keeps the store's lock (fsck: to repair the
    /// database with no daemon let in meanwhile).
    pub(crate) fn close(self) -> StoreLock {
        let Store { db, lock, .. } = self;
        drop(db);
        lock
    }

    /// When this process took the store's lock, on the store filesystem's
    /// clock: every blob file this process links has a later or equal
    /// ctime (`link()` and the `chmod` after it set the file's ctime), so
    /// a blob file with an earlier ctime was linked before (by an earlier
    /// daemon).
    pub fn opened_at(&self) -> FileTime {
        self.lock.taken_at
    }

    /// Runs `f` on the raw database (the offline checker: it reads every
    /// column family in order and looks records up in between, which the
    /// typed calls cannot do under one hold). `f` must not call the store.
    pub(crate) fn with_db<T>(&self, f: impl FnOnce(&DB) -> T) -> Result<T> {
        let db = self.db()?;
        Ok(f(&db))
    }

    /// A column family's handle, for `with_db`.
    pub(crate) fn handle(db: &DB, cf: Cf) -> &ColumnFamily {
        Store::cf(db, cf)
    }

    /// RocksDB's estimate of the records in a column family (progress).
    pub fn estimate_records(&self, cf: Cf) -> u64 {
        self.with_db(|db| {
            db.property_int_value_cf(Store::cf(db, cf), "rocksdb.estimate-num-keys")
                .ok()
                .flatten()
                .unwrap_or(0)
        })
        .unwrap_or(0)
    }

    /// The blob ids on record whose first byte is `shard` (the blob files
    /// of `blobs/<shard>/`), in order: the orphan sweep's side of its
    /// merge with a shard's directory listing (a few thousand ids for a
    /// million-blob store).
    pub fn blob_ids_in_shard(&self, shard: u8) -> Result<Vec<BlobId>> {
        let mut out = Vec::new();
        let db = self.db()?;
        let iter = db.iterator_cf(
            Store::cf(&db, Cf::Blobs),
            IteratorMode::From(&[shard], Direction::Forward),
        );
        for item in iter {
            let (k, _) = item.map_err(|e| Error::db(e, "read blobs"))?;
            if k.first() != Some(&shard) {
                break;
            }
            // A key that is no blob id is fsck's to report; the sweep only
            // needs the ids that are.
            if let Ok(id) = blob_key_id(&k) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// A shared hold on the database for one call. A database left closed
    /// by a failed reopen is reopened first (`recover`).
    fn db(&self) -> Result<Db<'_>> {
        assert_db_not_held();
        for _ in 0..2 {
            let guard = self.db.read().unwrap();
            if guard.is_some() {
                // Read under the hold: a reopen takes `db` exclusively.
                let generation = self.generation.load(Ordering::Acquire);
                DB_HELD.with(|h| h.set(true));
                return Ok(Db { guard, generation });
            }
            drop(guard);
            self.recover()?;
        }
        Err(Error::with_context(
            libc::EIO,
            format!(
                "metadata store {}: the database is closed (a reopen is in progress)",
                self.root.display()
            ),
        ))
    }

    /// Runs one write on the database. A database stopped by an earlier
    /// failed write is reopened first, once the disk has room again (else
    /// ENOSPC at once: RocksDB would refuse it anyway); a write that fails
    /// marks the database stopped (see `Store`).
    fn write(
        &self,
        what: &str,
        f: impl FnOnce(&DB) -> std::result::Result<(), rocksdb::Error>,
    ) -> Result<()> {
        if self.broken.load(Ordering::Acquire) {
            self.recover()?;
        }
        let db = self.db()?;
        let generation = db.generation;
        let result = f(&db);
        drop(db);
        result.map_err(|e| self.write_failed(generation, Error::db(e, what)))
    }

    /// Marks the database stopped after a failed write (unless it was
    /// reopened since the write began); logs once per episode.
    fn write_failed(&self, generation: u64, err: Error) -> Error {
        let mut ep = self.episode.lock().unwrap();
        if generation != self.generation.load(Ordering::Acquire)
            || self.broken.load(Ordering::Acquire)
        {
            return err;
        }
        *ep = Episode {
            since_ns: wall_ns(),
            errno: err.code(),
            ..Episode::default()
        };
        self.broken.store(true, Ordering::Release);
        log::warn!(
            "metadata store {}: {err}. The database refuses every write after a failed one, so changes get {} \
             (reads go on) until the disk has room above its reserve again; then it is reopened, without a remount",
            self.root.display(),
            std::io::Error::from_raw_os_error(err.code())
        );
        err
    }

    /// True while the database is stopped by a failed write.
    pub fn is_stopped(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Reopens a database stopped by a failed write, once the filesystem
    /// has room above its reserve (ENOSPC until then; the errno of the
    /// failure while a failed reopen waits `REOPEN_INTERVAL_NS`).
    fn recover(&self) -> Result<()> {
        assert_db_not_held();
        let mut ep = self.episode.lock().unwrap();
        let closed = self.db.read().unwrap().is_none();
        if !self.broken.load(Ordering::Acquire) && !closed {
            return Ok(()); // another thread reopened it
        }
        if !space::room(&self.root)?.above_reserve() {
            return Err(Error::errno(libc::ENOSPC));
        }
        let now = wall_ns();
        if ep.last_reopen_ns != 0 && now < ep.last_reopen_ns + REOPEN_INTERVAL_NS {
            return Err(Error::errno(ep.errno));
        }
        ep.last_reopen_ns = now;
        let mut db = self.db.write().unwrap();
        // Closing stops RocksDB's own background work and recovery; the
        // log it leaves holds every write that returned Ok.
        *db = None;
        match open_db(&self.root, OpenMode::Existing) {
            Ok(new) => {
                *db = Some(new);
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.broken.store(false, Ordering::Release);
                drop(db);
                log::info!(
                    "metadata store {}: the disk has room again; database reopened after {} s stopped, writes accepted again",
                    self.root.display(),
                    now.saturating_sub(ep.since_ns) / 1_000_000_000
                );
                *ep = Episode::default();
                Ok(())
            }
            Err(e) => {
                let err = Error::db(e, "reopen the database");
                if !ep.reopen_failed_logged {
                    ep.reopen_failed_logged = true;
                    log::warn!(
                        "metadata store {}: {err}; every call fails until a reopen succeeds (retried at most once a second)",
                        self.root.display()
                    );
                }
                ep.errno = err.code();
                Err(err)
            }
        }
    }

    fn get(&self, cf: Cf, key: &[u8], what: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db()?;
        db.get_cf(Store::cf(&db, cf), key)
            .map_err(|e| Error::db(e, what))
    }

    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            ops: Vec::new(),
        }
    }

    /// The error for a record of `cf` under `key` that does not decode: EIO,
    /// saying which record (`what`) and what is wrong, and what to do. The
    /// first time a key is seen damaged it is logged (so a name the kernel
    /// keeps asking for does not fill the log); the record is left as it
    /// is for `casfs fsck` to report and repair.
    pub(crate) fn damaged(&self, cf: Cf, key: &[u8], what: impl fmt::Display, d: Damage) -> Error {
        let cf_name = CFS[cf as usize].1;
        let context = format!(
            "metadata: {what} is damaged ({d}); unmount, then run `casfs fsck --store {}` \
             (add --repair to mend it)",
            self.root.display()
        );
        let first = {
            let mut log = self.damage_logged.lock().unwrap();
            if log.keys.len() < DAMAGE_LOG_KEYS_MAX {
                log.keys.insert((cf as usize, key.to_vec()))
            } else if !log.keys.contains(&(cf as usize, key.to_vec())) && !log.overflowed {
                log.overflowed = true;
                log::warn!(
                    "metadata: over {DAMAGE_LOG_KEYS_MAX} damaged records; the others are not logged one by one"
                );
                false
            } else {
                false
            }
        };
        if first {
            log::warn!("damaged record cf={cf_name} key={}: {context}", shown(key));
        }
        Error::with_context(libc::EIO, context)
    }

    pub fn inode(&self, ino: Ino) -> Result<Option<Inode>> {
        let db = self.db()?;
        let v = db
            .get_pinned_cf(Store::cf(&db, Cf::Inodes), ino.key())
            .map_err(|e| Error::db(e, "read inode"))?;
        match v {
            None => Ok(None),
            Some(v) => match Inode::decode(ino, &v) {
                Ok(mut inode) => {
                    self.touches.apply(&mut inode);
                    Ok(Some(inode))
                }
                Err(d) => Err(self.damaged(Cf::Inodes, &ino.key(), format_args!("inode {ino}"), d)),
            },
        }
    }

    pub fn dentry(&self, parent: Ino, name: &[u8]) -> Result<Option<Ino>> {
        let key = dentry_key(parent, name);
        let db = self.db()?;
        let v = db
            .get_pinned_cf(Store::cf(&db, Cf::Dentries), &key)
            .map_err(|e| Error::db(e, "read directory entry"))?;
        match v {
            None => Ok(None),
            Some(v) => Ino::from_key(&v).map(Some).map_err(|d| {
                let what = format_args!("entry {:?} of directory {parent}", shown(name));
                self.damaged(Cf::Dentries, &key, what, d)
            }),
        }
    }

    /// Entries of a directory, in key order, at most `limit`.
    pub fn list_dir(&self, parent: Ino, limit: usize) -> Result<Vec<(Vec<u8>, Ino)>> {
        let prefix = parent.key();
        let mut out = Vec::new();
        let db = self.db()?;
        let iter = db.iterator_cf(
            Store::cf(&db, Cf::Dentries),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| Error::db(e, "list directory"))?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let what = || format!("an entry of directory {parent}");
            let (_, name) =
                split_dentry_key(&k).map_err(|d| self.damaged(Cf::Dentries, &k, what(), d))?;
            let child = Ino::from_key(&v).map_err(|d| {
                let what = format!("entry {:?} of directory {parent}", shown(name));
                self.damaged(Cf::Dentries, &k, what, d)
            })?;
            out.push((name.to_vec(), child));
        }
        Ok(out)
    }

    pub fn dir_is_empty(&self, parent: Ino) -> Result<bool> {
        Ok(self.list_dir(parent, 1)?.is_empty())
    }

    /// Inodes referencing a blob, at most `limit`.
    pub fn blob_refs(&self, id: &BlobId, limit: usize) -> Result<Vec<Ino>> {
        let mut out = Vec::new();
        let db = self.db()?;
        let iter = db.iterator_cf(
            Store::cf(&db, Cf::BlobRefs),
            IteratorMode::From(&id.0, Direction::Forward),
        );
        for item in iter {
            let (k, _) = item.map_err(|e| Error::db(e, "read blob references"))?;
            if !k.starts_with(&id.0) || out.len() >= limit {
                break;
            }
            let (_, ino) = split_blob_ref_key(&k).map_err(|d| {
                self.damaged(
                    Cf::BlobRefs,
                    &k,
                    format_args!("a reference to blob {id}"),
                    d,
                )
            })?;
            out.push(ino);
        }
        Ok(out)
    }

    /// The first blob at or after `from` in id order, wrapping around (the
    /// scrub's random sample). A key that is no blob id is reported (once,
    /// `damaged`) and passed over, so the scrub goes on with the others.
    pub fn blob_at_or_after(&self, from: &[u8; 32]) -> Result<Option<BlobId>> {
        let db = self.db()?;
        for start in [&from[..], &[][..]] {
            let iter = db.iterator_cf(
                Store::cf(&db, Cf::Blobs),
                IteratorMode::From(start, Direction::Forward),
            );
            for item in iter {
                let (k, _) = item.map_err(|e| Error::db(e, "read blobs"))?;
                match blob_key_id(&k) {
                    Ok(id) => return Ok(Some(id)),
                    Err(d) => drop(self.damaged(Cf::Blobs, &k, "a blob record", d)),
                }
            }
        }
        Ok(None)
    }

    pub fn blob_known(&self, id: &BlobId) -> Result<bool> {
        let db = self.db()?;
        let found = db
            .get_pinned_cf(Store::cf(&db, Cf::Blobs), id.0)
            .map_err(|e| Error::db(e, "read blob"))?
            .is_some();
        Ok(found)
    }

    pub fn pending(&self) -> Result<Vec<(Ino, PendingReason)>> {
        let mut out = Vec::new();
        let db = self.db()?;
        for item in db.iterator_cf(Store::cf(&db, Cf::Pending), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| Error::db(e, "read pending"))?;
            let ino = Ino::from_key(&k)
                .map_err(|d| self.damaged(Cf::Pending, &k, "a pending record's key", d))?;
            // A reason that does not decode is taken as the stronger one:
            // unsealed drops the inode's names as well as the inode, which
            // is right for either reason (the record says the inode is
            // unfinished, whichever way).
            let reason = PendingReason::decode(&v).unwrap_or_else(|d| {
                let what = format_args!("the pending record of inode {ino} (taken as unsealed)");
                drop(self.damaged(Cf::Pending, &k, what, d));
                PendingReason::Unsealed
            });
            out.push((ino, reason));
        }
        Ok(out)
    }

    pub fn upload_is_pending(&self, seq: u64, path: &[u8]) -> Result<bool> {
        let db = self.db()?;
        let found = db
            .get_pinned_cf(Store::cf(&db, Cf::Uploads), upload_key(seq, path))
            .map_err(|e| Error::db(e, "read pending upload"))?
            .is_some();
        Ok(found)
    }

    /// The oldest pending uploads, in publication order, at most `limit`.
    /// A record that does not decode is reported and dropped (it could
    /// never be delivered, and would hold `casfs sync` forever).
    pub fn pending_uploads(&self, limit: usize) -> Result<Vec<PendingUpload>> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        {
            let db = self.db()?;
            for item in db.iterator_cf(Store::cf(&db, Cf::Uploads), IteratorMode::Start) {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item.map_err(|e| Error::db(e, "read pending uploads"))?;
                match PendingUpload::decode(&k, &v) {
                    Ok(u) => out.push(u),
                    Err(d) => damaged.push((k.to_vec(), d)),
                }
            }
        }
        for (k, d) in damaged {
            log::warn!(
                "damaged record cf=uploads key={}: {d}; dropped (that publication is not shared)",
                shown(&k)
            );
            self.write("drop damaged pending upload", |db| {
                db.delete_cf(Store::cf(db, Cf::Uploads), &k)
            })?;
        }
        Ok(out)
    }

    /// The publication tick of the oldest pending upload. A key that does
    /// not decode is passed over: `pending_uploads` reports and drops it.
    pub fn oldest_upload_seq(&self) -> Result<Option<u64>> {
        let db = self.db()?;
        for item in db.iterator_cf(Store::cf(&db, Cf::Uploads), IteratorMode::Start) {
            let (k, _) = item.map_err(|e| Error::db(e, "read pending uploads"))?;
            if let Ok((seq, _)) = split_upload_key(&k) {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }

    /// How many uploads are pending (a full scan: at mount only).
    pub fn count_uploads(&self) -> Result<u64> {
        let mut n = 0;
        let db = self.db()?;
        for item in db.iterator_cf(Store::cf(&db, Cf::Uploads), IteratorMode::Start) {
            item.map_err(|e| Error::db(e, "count pending uploads"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Forgets a pending upload (delivered or given up). Not synced: a
    /// process crash keeps it written; power loss may replay a delivered
    /// upload, which is harmless.
    pub fn delete_upload(&self, seq: u64, path: &[u8]) -> Result<()> {
        self.write("delete pending upload", |db| {
            db.delete_cf(Store::cf(db, Cf::Uploads), upload_key(seq, path))
        })
    }

    /// The inode-number lease: every number at or above it is unused.
    ///
    /// It is never below the highest inode number in use plus one: every
    /// number in use has an inode record, and their keys sort by number
    /// (big-endian), so the last key is the highest (one iterator step). A
    /// lease that does not decode, or that is behind that (a record lost
    /// or rolled back by a repair of the database), is derived again from
    /// it (logged); a missing one is derived silently (a new store). The
    /// allocator writes a fresh lease before it hands out the first number.
    /// Starting below a number in use would hand it out again and
    /// overwrite a live inode, so a lease is never trusted on its own.
    pub fn ino_lease(&self) -> Result<u64> {
        let v = self.get(Cf::Meta, KEY_NEXT_INO, "read next inode")?;
        let last_key = {
            let db = self.db()?;
            let mut last = db.iterator_cf(Store::cf(&db, Cf::Inodes), IteratorMode::End);
            match last.next() {
                None => None,
                Some(item) => Some(item.map_err(|e| Error::db(e, "read inodes"))?.0.to_vec()),
            }
        };
        let highest = match last_key {
            None => 0,
            Some(k) => {
                Ino::from_key(&k)
                    .map_err(|d| self.damaged(Cf::Inodes, &k, "an inode record's key", d))?
                    .0
            }
        };
        let floor = highest
            .checked_add(1)
            .filter(|l| *l <= LEASE_MAX)
            .ok_or_else(|| {
                let d = Damage::new(format!("inode number {highest} is over {LEASE_MAX}"));
                self.damaged(Cf::Inodes, &Ino(highest).key(), "the last inode record", d)
            })?
            .max(Ino::FIRST_DYNAMIC.0);
        let Some(v) = v else {
            return Ok(floor);
        };
        match lease_value(&v) {
            Ok(lease) if lease >= floor => Ok(lease),
            Ok(lease) => {
                log::warn!(
                    "the inode-number lease {lease} is not above inode {highest}, which is in use \
                     (a repaired database?); the lease is derived again from the inode records: {floor}"
                );
                Ok(floor)
            }
            Err(d) => {
                log::warn!(
                    "damaged record cf=meta key={}: {d}; the inode-number lease is derived again from \
                     the inode records: {floor}",
                    shown(KEY_NEXT_INO)
                );
                Ok(floor)
            }
        }
    }

    /// Raises the inode-number lease. Not synced: a batch that uses a number
    /// below it is written to the log after this, so a crash that loses the
    /// lease loses every batch that used it too.
    pub fn put_ino_lease(&self, lease: u64) -> Result<()> {
        self.write("write inode lease", |db| {
            db.put_cf(Store::cf(db, Cf::Meta), KEY_NEXT_INO, lease.to_le_bytes())
        })
    }

    /// True once a one-time conversion of an older store, named by `key`,
    /// has been done.
    pub fn converted(&self, key: &str) -> Result<bool> {
        let key = format!("converted:{key}");
        Ok(self
            .get(Cf::Meta, key.as_bytes(), "read conversion marker")?
            .is_some())
    }

    /// Records (synced) that the conversion `key` is done.
    pub fn mark_converted(&self, key: &str) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.write("write conversion marker", |db| {
            db.put_cf_opt(Store::cf(db, Cf::Meta), format!("converted:{key}"), [], &wo)
        })
    }

    /// Persists the clock's lease (same ordering argument as the inode lease).
    pub fn put_clock_lease(&self, lease_ns: u64) -> Result<()> {
        self.write("write clock lease", |db| {
            db.put_cf(Store::cf(db, Cf::Clock), KEY_LEASE, lease_ns.to_le_bytes())
        })
    }

    /// Makes every batch written so far durable. A synced write of one
    /// marker record, rather than `flush_wal(true)`: RocksDB syncs the log
    /// once for every writer that joined the same write group (group
    /// commit), while concurrent `flush_wal` calls each wait for the other
    /// syncs and then sync again. The log is in write order, so the sync
    /// covers every batch committed before it.
    pub fn sync_log(&self) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.write("sync log", |db| {
            db.put_cf_opt(Store::cf(db, Cf::Meta), KEY_SYNC_MARKER, [], &wo)
        })
    }

    /// The clock's persisted lease (zero for a new store). One that does
    /// not decode is an error: starting the clock anywhere else could hand
    /// out times below ones already used; `casfs fsck --repair` derives it
    /// again from the recorded times.
    pub fn clock_lease(&self) -> Result<u64> {
        let v = self.get(Cf::Clock, KEY_LEASE, "read clock")?;
        match v {
            None => Ok(0),
            Some(v) => lease_value(&v)
                .map_err(|d| self.damaged(Cf::Clock, KEY_LEASE, "the clock lease", d)),
        }
    }

    /// The store gauges (zero for a new store). A gauge that does not decode
    /// is an error (`casfs fsck --repair` recounts it), never a zero.
    pub fn gauges(&self) -> Result<StoreGauges> {
        let get = |key: &[u8]| -> Result<u64> {
            let v = self.get(Cf::Counters, key, "read counters")?;
            match v {
                None => Ok(0),
                Some(v) => match gauge_value(&v) {
                    Ok(n) => Ok(n.max(0) as u64),
                    Err(d) => {
                        let what = format_args!("store gauge {}", shown(key));
                        Err(self.damaged(Cf::Counters, key, what, d))
                    }
                },
            }
        };
        Ok(StoreGauges {
            blobs: get(KEY_GAUGE_BLOBS)?,
            bytes_stored: get(KEY_GAUGE_BYTES_STORED)?,
            bytes_logical: get(KEY_GAUGE_BYTES_LOGICAL)?,
        })
    }

    /// Converts the retired one-record gauges of an older store into the
    /// per-gauge keys (once, in one batch).
    fn convert_retired_gauges(&self) -> std::result::Result<(), String> {
        let Some(v) = self
            .get(Cf::Counters, KEY_GAUGES_RETIRED, "read retired gauges")
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let keys = [
            KEY_GAUGE_BLOBS,
            KEY_GAUGE_BYTES_STORED,
            KEY_GAUGE_BYTES_LOGICAL,
        ];
        let values: Vec<Vec<u8>> = match exact::<24>(&v, "the retired gauges record (three u64)") {
            Ok(all) => all.chunks_exact(8).map(<[u8]>::to_vec).collect(),
            // Not a zero: the gauges stay damaged until fsck recounts them.
            Err(d) => {
                log::warn!(
                    "damaged record cf=counters key=gauges: {d}; the gauges are marked damaged \
                     until `casfs fsck --store {} --repair` recounts them",
                    self.root.display()
                );
                vec![GAUGE_DAMAGED.to_vec(); 3]
            }
        };
        self.write("convert retired gauges", |db| {
            let cf = Store::cf(db, Cf::Counters);
            let mut wb = WriteBatch::default();
            for (key, value) in keys.iter().zip(&values) {
                wb.put_cf(cf, key, value);
            }
            wb.delete_cf(cf, KEY_GAUGES_RETIRED);
            db.write(wb)?;
            db.flush_wal(true)
        })
        .map_err(|e| e.to_string())
    }

    /// Writes raw bytes under a key (tests: damage a record).
    #[cfg(test)]
    pub(crate) fn put_raw(&self, cf: Cf, key: &[u8], value: &[u8]) {
        self.write("put raw", |db| db.put_cf(Store::cf(db, cf), key, value))
            .unwrap();
    }

    /// Calls `f` on every inode record (a full scan: eviction).
    /// `f` must not call the store (the database is held meanwhile).
    pub fn for_each_inode(&self, mut f: impl FnMut(Result<Inode>)) -> Result<()> {
        let db = self.db()?;
        for item in db.iterator_cf(Store::cf(&db, Cf::Inodes), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| Error::db(e, "scan inodes"))?;
            f(Ino::from_key(&k)
                .map_err(|d| self.damaged(Cf::Inodes, &k, "an inode record's key", d))
                .and_then(|ino| {
                    let mut inode = Inode::decode(ino, &v).map_err(|d| {
                        self.damaged(Cf::Inodes, &k, format_args!("inode {ino}"), d)
                    })?;
                    self.touches.apply(&mut inode);
                    Ok(inode)
                }));
        }
        Ok(())
    }

    /// Makes everything written durable at unmount: the log synced, and
    /// the memtable of every column family that has records but no table
    /// file yet flushed into one. RocksDB's own repair (`dbrepair`) rebuilds
    /// the column families it finds in table files and drops, whole, every
    /// log batch that touches one it did not find; so a column family that
    /// lives only in the log (a new store's first session) would take every
    /// publication's batch down with it. Column families with tables lose
    /// nothing to the repair (their log records are turned into tables),
    /// so they are not flushed here: the next open does that, and the
    /// unmount pays no extra syncs.
    pub fn flush(&self) -> Result<()> {
        self.write("flush log", |db| db.flush_wal(true))?;
        self.write("flush memtables", |db| {
            let int = |cf: &ColumnFamily, p: &str| db.property_int_value_cf(cf, p).ok().flatten();
            let cfs: Vec<&ColumnFamily> = CFS
                .iter()
                .map(|(cf, _)| Store::cf(db, *cf))
                .filter(|cf| {
                    int(cf, "rocksdb.live-sst-files-size") == Some(0)
                        && int(cf, "rocksdb.num-entries-active-mem-table").unwrap_or(0)
                            + int(cf, "rocksdb.num-entries-imm-mem-tables").unwrap_or(0)
                            > 0
                })
                .collect();
            if cfs.is_empty() {
                return Ok(());
            }
            db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
        })
    }
}

/// One operation of a batch, kept until the batch is committed (so that
/// building a batch holds nothing of the database, which a reopen may
/// replace meanwhile).
enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    Merge(Cf, &'static [u8], [u8; 8]),
}

/// One atomic change to the metadata.
pub struct Batch<'a> {
    store: &'a Store,
    ops: Vec<Op>,
}

impl Batch<'_> {
    pub fn put_inode(&mut self, inode: &Inode) {
        self.ops.push(Op::Put(
            Cf::Inodes,
            inode.ino.key().to_vec(),
            inode.encode(),
        ));
    }
    pub fn delete_inode(&mut self, ino: Ino) {
        self.ops.push(Op::Delete(Cf::Inodes, ino.key().to_vec()));
    }
    pub fn put_dentry(&mut self, parent: Ino, name: &[u8], child: Ino) {
        self.ops.push(Op::Put(
            Cf::Dentries,
            dentry_key(parent, name),
            child.key().to_vec(),
        ));
    }
    pub fn delete_dentry(&mut self, parent: Ino, name: &[u8]) {
        self.ops
            .push(Op::Delete(Cf::Dentries, dentry_key(parent, name)));
    }
    pub fn put_blob(&mut self, id: &BlobId, size: u64) {
        self.ops.push(Op::Put(
            Cf::Blobs,
            id.0.to_vec(),
            size.to_le_bytes().to_vec(),
        ));
    }
    pub fn delete_blob(&mut self, id: &BlobId) {
        self.ops.push(Op::Delete(Cf::Blobs, id.0.to_vec()));
    }
    pub fn put_blob_ref(&mut self, id: &BlobId, ino: Ino) {
        self.ops
            .push(Op::Put(Cf::BlobRefs, blob_ref_key(id, ino), Vec::new()));
    }
    pub fn delete_blob_ref(&mut self, id: &BlobId, ino: Ino) {
        self.ops
            .push(Op::Delete(Cf::BlobRefs, blob_ref_key(id, ino)));
    }
    pub fn put_pending(&mut self, ino: Ino, reason: PendingReason) {
        self.ops
            .push(Op::Put(Cf::Pending, ino.key().to_vec(), vec![reason as u8]));
    }
    pub fn delete_pending(&mut self, ino: Ino) {
        self.ops.push(Op::Delete(Cf::Pending, ino.key().to_vec()));
    }
    /// Records a publication to deliver to the shared tier, in the batch
    /// that publishes it (so it is exactly as durable as the publication).
    pub fn put_upload(&mut self, up: &PendingUpload) {
        self.ops.push(Op::Put(Cf::Uploads, up.key(), up.encode()));
    }
    /// Deletes a record whatever its key (fsck, for records that do not
    /// decode, so no typed delete can name them).
    pub fn delete_raw(&mut self, cf: Cf, key: &[u8]) {
        self.ops.push(Op::Delete(cf, key.to_vec()));
    }

    /// Forgets the store gauges (fsck, for gauges that do not decode): the
    /// deltas added after it in the same batch are their new values.
    pub fn reset_gauges(&mut self) {
        for key in [
            KEY_GAUGE_BLOBS,
            KEY_GAUGE_BYTES_STORED,
            KEY_GAUGE_BYTES_LOGICAL,
        ] {
            self.ops.push(Op::Delete(Cf::Counters, key.to_vec()));
        }
    }

    /// Adds signed deltas to the store gauges (merge, no read).
    pub fn add_gauges(&mut self, blobs: i64, bytes_stored: i64, bytes_logical: i64) {
        for (key, delta) in [
            (KEY_GAUGE_BLOBS, blobs),
            (KEY_GAUGE_BYTES_STORED, bytes_stored),
            (KEY_GAUGE_BYTES_LOGICAL, bytes_logical),
        ] {
            if delta != 0 {
                self.ops
                    .push(Op::Merge(Cf::Counters, key, delta.to_le_bytes()));
            }
        }
    }

    /// Applies the batch atomically. `sync` makes it durable against power
    /// loss before returning (a process crash never loses a written batch).
    pub fn commit(self, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        let ops = self.ops;
        self.store.write("write batch", |db| {
            let mut wb = WriteBatch::default();
            for op in &ops {
                match op {
                    Op::Put(cf, k, v) => wb.put_cf(Store::cf(db, *cf), k, v),
                    Op::Delete(cf, k) => wb.delete_cf(Store::cf(db, *cf), k),
                    Op::Merge(cf, k, v) => wb.merge_cf(Store::cf(db, *cf), k, v),
                }
            }
            db.write_opt(wb, &wo)
        })?;
        // The records of these inodes now carry their pending touches.
        for op in &ops {
            if let Op::Put(Cf::Inodes, k, _) | Op::Delete(Cf::Inodes, k) = op {
                if let Ok(ino) = Ino::from_key(k) {
                    self.store.touches.landed(ino);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_record_round_trips() {
        let inode = Inode {
            ino: Ino(42),
            kind: Kind::File,
            class: Class::Result,
            perm: 0o644,
            uid: 1,
            gid: 2,
            nlink: 1,
            size: 123,
            mtime_ns: 5,
            atime_ns: None,
            ctime_ns: 6,
            mtime_set: false,
            parent: Ino(1),
            name: b"abcR".to_vec(),
            links: Vec::new(),
            content: Content::Blob(BlobId::of(b"x")),
        };
        assert_eq!(Inode::decode(Ino(42), &inode.encode()), Ok(inode.clone()));
        let link = Inode {
            kind: Kind::Symlink,
            content: Content::Symlink(b"target".to_vec()),
            ..inode
        };
        assert_eq!(Inode::decode(Ino(42), &link.encode()), Ok(link.clone()));
        // Special files: kind and device number round-trip; the records of
        // the older kinds above are encoded exactly as before they existed.
        for kind in [
            Kind::Fifo,
            Kind::Socket,
            Kind::CharDevice,
            Kind::BlockDevice,
        ] {
            let node = Inode {
                kind,
                class: Class::Local,
                content: Content::Device(0x0801),
                ..link.clone()
            };
            assert_eq!(Inode::decode(Ino(42), &node.encode()), Ok(node));
        }
        let touched = Inode {
            atime_ns: Some(7),
            mtime_set: true,
            links: vec![(Ino(3), b"other".to_vec()), (Ino(4), b"third".to_vec())],
            ..link
        };
        assert_eq!(Inode::decode(Ino(42), &touched.encode()), Ok(touched));
        assert!(Inode::decode(Ino(1), &[9, 9]).is_err());
    }

    #[test]
    fn pending_upload_record_round_trips_and_keys_sort_by_publication() {
        let up = PendingUpload {
            seq: 1_700_000_000_000_000_123,
            path: b"cc/a/b/cdefR".to_vec(),
            create_only: true,
            blob: BlobId::of(b"x"),
            size: 1,
            mode: 0o644,
            mtime_ns: 7,
        };
        assert_eq!(
            PendingUpload::decode(&up.key(), &up.encode()),
            Ok(up.clone())
        );
        assert!(PendingUpload::decode(&up.key(), &[2]).is_err());
        assert!(upload_key(255, b"zz") < upload_key(256, b"aa"));
    }

    #[test]
    fn damaged_gauges_and_leases_are_errors_or_derived_never_zero_and_writes_go_on() {
        let root = std::env::temp_dir().join(format!(
            "casfs-meta-damaged-{}-{}",
            std::process::id(),
            crate::store::clock::wall_ns()
        ));
        let store = open_store(&root).unwrap();
        let inode = Inode {
            ino: Ino(70_000),
            ..sample_inode()
        };
        let mut b = store.batch();
        b.put_inode(&inode);
        b.add_gauges(2, 10, 10);
        b.commit(false).unwrap();
        assert_eq!(store.gauges().unwrap().blobs, 2);

        // A gauge that does not decode stays damaged through merges and a
        // compaction (which a failing merge operator would stop), and
        // writes go on; resetting it is what fsck --repair does.
        store.put_raw(Cf::Counters, KEY_GAUGE_BLOBS, &[1, 2, 3]);
        let mut b = store.batch();
        b.add_gauges(1, 1, 1);
        b.commit(false).unwrap();
        let e = store.gauges().unwrap_err();
        assert_eq!(e.code(), libc::EIO);
        assert!(e.to_string().contains("gauge_blobs"), "{e}");
        {
            let db = store.db().unwrap();
            db.compact_range_cf(Store::cf(&db, Cf::Counters), None::<&[u8]>, None::<&[u8]>);
        }
        let mut b = store.batch();
        b.add_gauges(1, 0, 0);
        b.commit(false).unwrap();
        assert!(store.gauges().is_err(), "a damaged gauge is no zero");
        let mut b = store.batch();
        b.reset_gauges();
        b.add_gauges(5, 6, 7);
        b.commit(false).unwrap();
        let g = store.gauges().unwrap();
        assert_eq!((g.blobs, g.bytes_stored, g.bytes_logical), (5, 6, 7));

        // Leases: the inode-number lease is derived again from the highest
        // inode; the clock's is an error (fsck derives it from the times).
        store.put_raw(Cf::Meta, KEY_NEXT_INO, &[9]);
        assert_eq!(store.ino_lease().unwrap(), 70_001);
        store.put_raw(Cf::Clock, KEY_LEASE, &u64::MAX.to_le_bytes());
        assert_eq!(store.clock_lease().unwrap_err().code(), libc::EIO);

        // Pending records: a damaged reason is taken as unsealed (the
        // stronger clean-up); a damaged key is an error.
        store.put_raw(Cf::Pending, &Ino(70_000).key(), &[9]);
        assert_eq!(
            store.pending().unwrap(),
            vec![(Ino(70_000), PendingReason::Unsealed)]
        );
        store.put_raw(Cf::Pending, &[1, 2, 3], &[1]);
        assert!(store.pending().is_err());

        // Uploads: a key that does not decode is passed over, then dropped.
        let up = PendingUpload {
            seq: 5,
            path: b"cc/x".to_vec(),
            create_only: true,
            blob: BlobId::of(b"y"),
            size: 1,
            mode: 0o644,
            mtime_ns: 5,
        };
        let mut b = store.batch();
        b.put_upload(&up);
        b.commit(false).unwrap();
        store.put_raw(Cf::Uploads, &[0], b"");
        assert_eq!(store.oldest_upload_seq().unwrap(), Some(5));
        assert_eq!(store.pending_uploads(10).unwrap(), vec![up]);
        assert_eq!(store.count_uploads().unwrap(), 1);

        // A retired gauges record of the wrong length: damaged, not zeros.
        store.put_raw(Cf::Counters, KEY_GAUGES_RETIRED, &[1; 5]);
        drop(store);
        let store = open_store(&root).unwrap();
        assert!(store.gauges().is_err());
        drop(store);
        let _ = fs::remove_dir_all(&root);
    }

    fn sample_inode() -> Inode {
        Inode {
            ino: Ino(42),
            kind: Kind::File,
            class: Class::Result,
            perm: 0o644,
            uid: 1,
            gid: 2,
            nlink: 1,
            size: 123,
            mtime_ns: 5,
            atime_ns: None,
            mtime_set: false,
            ctime_ns: 6,
            parent: Ino(1),
            name: b"abcR".to_vec(),
            links: Vec::new(),
            content: Content::Blob(BlobId::of(b"x")),
        }
    }

    #[test]
    fn a_store_from_before_the_uploads_column_family_opens_and_gets_it() {
        let root = std::env::temp_dir().join(format!(
            "casfs-meta-old-store-{}-{}",
            std::process::id(),
            crate::store::clock::wall_ns()
        ));
        {
            let mut store = open_store(&root).unwrap();
            // As a store written before `Cf::Uploads` existed.
            store
                .db
                .get_mut()
                .unwrap()
                .as_mut()
                .unwrap()
                .drop_cf("uploads")
                .unwrap();
        }
        let store = open_store(&root).unwrap();
        let up = PendingUpload {
            seq: 5,
            path: b"cc/x".to_vec(),
            create_only: false,
            blob: BlobId::of(b"y"),
            size: 1,
            mode: 0o644,
            mtime_ns: 5,
        };
        let mut b = store.batch();
        b.put_upload(&up);
        b.commit(false).unwrap();
        assert_eq!(store.pending_uploads(10).unwrap(), vec![up]);
        assert_eq!(store.oldest_upload_seq().unwrap(), Some(5));
        store.delete_upload(5, b"cc/x").unwrap();
        assert_eq!(store.count_uploads().unwrap(), 0);
        drop(store);
        let _ = fs::remove_dir_all(&root);
    }
}
