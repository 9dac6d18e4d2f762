//! The metadata store: RocksDB with one column family per kind of record,
//! plus the store directory's identity, format version and single-daemon lock.
//!
//! Store directory layout (names are forever):
//!   casfs-store   marker file naming the format ("casfs store format 1")
//!   lock          held with flock() by the one daemon using the store
//!   meta/         RocksDB
//!   blobs/xx/<64 hex>   blob files (see blobs.rs)
//!   staging/<ino>       bytes not yet (or never) published: writes in
//!                       progress and host-local files
//!   quarantine/   blobs that failed verification, kept for inspection
//!
//! Invariants:
//! - Every change touching several keys is one `WriteBatch`.
//! - Column family names and key layouts are added, never renamed.
//! - A store with an unknown format version is refused, never "upgraded"
//!   by guessing.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};

use crate::classes::Class;
use crate::error::{Error, Result};
use crate::stats::StoreGauges;
use crate::store::ids::{BlobId, Ino};

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
const KEY_NEXT_INO: &[u8] = b"next_ino";
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

/// The counters' merge operator: values and operands are i64 little-endian
/// deltas, and the value is their sum (a gauge never goes below zero).
fn add_merge(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut sum = existing.map_or(0, i64_value);
    for op in operands {
        sum = sum.wrapping_add(i64_value(op));
    }
    Some(sum.to_le_bytes().to_vec())
}

fn i64_value(v: &[u8]) -> i64 {
    u64_value(v) as i64
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

    pub fn decode(ino: Ino, b: &[u8]) -> Option<Inode> {
        let mut r = Reader(b);
        if r.u8()? != 1 {
            return None;
        }
        let kind = match r.u8()? {
            1 => Kind::Dir,
            2 => Kind::File,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDevice,
            7 => Kind::BlockDevice,
            _ => return None,
        };
        let class = Class::from_code(r.u8()?)?;
        let perm = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
        let uid = r.u32()?;
        let gid = r.u32()?;
        let nlink = r.u32()?;
        let size = r.u64()?;
        let mtime_ns = r.u64()?;
        let ctime_ns = r.u64()?;
        let parent = Ino(r.u64()?);
        let name_len = u16::from_le_bytes(r.take(2)?.try_into().ok()?) as usize;
        let name = r.take(name_len)?.to_vec();
        let content = match r.u8()? {
            0 => Content::None,
            1 => Content::Staged,
            2 => Content::Blob(BlobId(r.take(32)?.try_into().ok()?)),
            3 => {
                let n = u16::from_le_bytes(r.take(2)?.try_into().ok()?) as usize;
                Content::Symlink(r.take(n)?.to_vec())
            }
            4 => Content::Device(r.u32()?),
            _ => return None,
        };
        let mut atime_ns = None;
        let mut mtime_set = false;
        let mut links = Vec::new();
        while let Some(tag) = r.u8() {
            match tag {
                TAG_ATIME => atime_ns = Some(r.u64()?),
                TAG_MTIME_SET => mtime_set = true,
                TAG_LINK => {
                    let parent = Ino(r.u64()?);
                    let n = u16::from_le_bytes(r.take(2)?.try_into().ok()?) as usize;
                    links.push((parent, r.take(n)?.to_vec()));
                }
                _ => return None,
            }
        }
        Some(Inode {
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
    fn key(&self) -> Vec<u8> {
        upload_key(self.seq, &self.path)
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(52);
        b.push(1); // record version
        b.push(self.create_only as u8);
        b.extend_from_slice(&self.blob.0);
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.mode.to_le_bytes());
        b.extend_from_slice(&self.mtime_ns.to_le_bytes());
        b
    }

    fn decode(key: &[u8], v: &[u8]) -> Option<PendingUpload> {
        let seq = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
        let mut r = Reader(v);
        if r.u8()? != 1 {
            return None;
        }
        let create_only = match r.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let blob = BlobId(r.take(32)?.try_into().ok()?);
        let size = r.u64()?;
        let mode = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
        let mtime_ns = r.u64()?;
        Some(PendingUpload {
            seq,
            path: key[8..].to_vec(),
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

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
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

fn u64_value_be(v: &[u8]) -> u64 {
    v.get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

pub fn u64_value(v: &[u8]) -> u64 {
    v.get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

/// An open store: the RocksDB handle and the lock that makes it ours.
pub struct Store {
    pub root: PathBuf,
    db: DB,
    _lock: File,
}

/// Opens (creating if new) the store at `root`. Errors are messages for an
/// operator: what is wrong and what to do.
pub fn open_store(root: &Path) -> std::result::Result<Store, String> {
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

    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_keep_log_file_num(4);
    opts.set_max_total_wal_size(64 << 20);
    let cfs = CFS.iter().map(|(cf, name)| {
        let mut o = Options::default();
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        if matches!(cf, Cf::Counters) {
            o.set_merge_operator_associative("casfs_add_i64", add_merge);
        }
        ColumnFamilyDescriptor::new(*name, o)
    });
    let db = DB::open_cf_descriptors(&opts, root.join("meta"), cfs)
        .map_err(|e| format!("cannot open metadata of store {}: {e}", root.display()))?;
    let store = Store {
        root: root.to_path_buf(),
        db,
        _lock: lock,
    };

    let recorded = store
        .db
        .get_cf(store.cf(Cf::Meta), KEY_FORMAT)
        .map_err(|e| e.to_string())?;
    match recorded {
        None if is_new => {
            store
                .db
                .put_cf(store.cf(Cf::Meta), KEY_FORMAT, FORMAT_VERSION.to_le_bytes())
                .map_err(|e| e.to_string())?;
            store.db.flush_wal(true).map_err(|e| e.to_string())?;
            write_marker(&marker)?;
        }
        None => {
            return Err(format!(
                "store {} has no format version in its metadata: it is damaged",
                root.display()
            ))
        }
        Some(v) if v.as_slice() == FORMAT_VERSION.to_le_bytes() => {}
        Some(v) => {
            return Err(format!(
                "store {} metadata has unknown format {v:?}",
                root.display()
            ))
        }
    }
    store.convert_retired_gauges()?;
    Ok(store)
}

fn write_marker(marker: &Path) -> std::result::Result<(), String> {
    let tmp = marker.with_extension("new");
    let mut f = File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    writeln!(f, "casfs store format {FORMAT_VERSION}").map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    fs::rename(&tmp, marker).map_err(|e| format!("cannot write {}: {e}", marker.display()))
}

/// Takes the store's exclusive lock, or says who holds it.
fn lock_store(root: &Path) -> std::result::Result<File, String> {
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
    Ok(f)
}

impl Store {
    fn cf(&self, cf: Cf) -> &ColumnFamily {
        let name = CFS[cf as usize].1;
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }

    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            wb: WriteBatch::default(),
        }
    }

    pub fn inode(&self, ino: Ino) -> Result<Option<Inode>> {
        let v = self
            .db
            .get_pinned_cf(self.cf(Cf::Inodes), ino.key())
            .map_err(|e| Error::db(e, "read inode"))?;
        match v {
            None => Ok(None),
            Some(v) => Inode::decode(ino, &v).map(Some).ok_or_else(|| {
                Error::with_context(libc::EIO, format!("inode {ino} record is damaged"))
            }),
        }
    }

    pub fn dentry(&self, parent: Ino, name: &[u8]) -> Result<Option<Ino>> {
        let v = self
            .db
            .get_pinned_cf(self.cf(Cf::Dentries), dentry_key(parent, name))
            .map_err(|e| Error::db(e, "read directory entry"))?;
        Ok(v.map(|v| Ino::from_key(&v)))
    }

    /// Entries of a directory, in key order, at most `limit`.
    pub fn list_dir(&self, parent: Ino, limit: usize) -> Result<Vec<(Vec<u8>, Ino)>> {
        let prefix = parent.key();
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(Cf::Dentries),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| Error::db(e, "list directory"))?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push((k[8..].to_vec(), Ino::from_key(&v)));
        }
        Ok(out)
    }

    pub fn dir_is_empty(&self, parent: Ino) -> Result<bool> {
        Ok(self.list_dir(parent, 1)?.is_empty())
    }

    /// Inodes referencing a blob, at most `limit`.
    pub fn blob_refs(&self, id: &BlobId, limit: usize) -> Result<Vec<Ino>> {
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(Cf::BlobRefs),
            IteratorMode::From(&id.0, Direction::Forward),
        );
        for item in iter {
            let (k, _) = item.map_err(|e| Error::db(e, "read blob references"))?;
            if !k.starts_with(&id.0) || out.len() >= limit {
                break;
            }
            out.push(Ino::from_key(&k[32..]));
        }
        Ok(out)
    }

    /// The first blob at or after `from` in id order, wrapping around (the
    /// scrub's random sample).
    pub fn blob_at_or_after(&self, from: &[u8; 32]) -> Result<Option<BlobId>> {
        for start in [&from[..], &[][..]] {
            let mut iter = self.db.iterator_cf(
                self.cf(Cf::Blobs),
                IteratorMode::From(start, Direction::Forward),
            );
            if let Some(item) = iter.next() {
                let (k, _) = item.map_err(|e| Error::db(e, "read blobs"))?;
                if let Ok(id) = <[u8; 32]>::try_from(&k[..]) {
                    return Ok(Some(BlobId(id)));
                }
            }
        }
        Ok(None)
    }

    pub fn blob_known(&self, id: &BlobId) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(Cf::Blobs), id.0)
            .map_err(|e| Error::db(e, "read blob"))?
            .is_some())
    }

    pub fn pending(&self) -> Result<Vec<(Ino, PendingReason)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(Cf::Pending), IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| Error::db(e, "read pending"))?;
            let reason = if v.first() == Some(&2) {
                PendingReason::Unsealed
            } else {
                PendingReason::Unbound
            };
            out.push((Ino::from_key(&k), reason));
        }
        Ok(out)
    }

    pub fn upload_is_pending(&self, seq: u64, path: &[u8]) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(Cf::Uploads), upload_key(seq, path))
            .map_err(|e| Error::db(e, "read pending upload"))?
            .is_some())
    }

    /// The oldest pending uploads, in publication order, at most `limit`.
    /// A record that does not decode is reported and dropped (it could
    /// never be delivered, and would hold `casfs sync` forever).
    pub fn pending_uploads(&self, limit: usize) -> Result<Vec<PendingUpload>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(Cf::Uploads), IteratorMode::Start)
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| Error::db(e, "read pending uploads"))?;
            match PendingUpload::decode(&k, &v) {
                Some(u) => out.push(u),
                None => {
                    log::warn!(
                        "pending upload record {:?} is damaged: dropped (that publication is not shared)",
                        k.escape_ascii().to_string()
                    );
                    self.db
                        .delete_cf(self.cf(Cf::Uploads), &k)
                        .map_err(|e| Error::db(e, "drop damaged pending upload"))?;
                }
            }
        }
        Ok(out)
    }

    /// The publication tick of the oldest pending upload.
    pub fn oldest_upload_seq(&self) -> Result<Option<u64>> {
        let mut iter = self
            .db
            .iterator_cf(self.cf(Cf::Uploads), IteratorMode::Start);
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (k, _) = item.map_err(|e| Error::db(e, "read pending uploads"))?;
                Ok(Some(u64_value_be(&k)))
            }
        }
    }

    /// How many uploads are pending (a full scan: at mount only).
    pub fn count_uploads(&self) -> Result<u64> {
        let mut n = 0;
        for item in self
            .db
            .iterator_cf(self.cf(Cf::Uploads), IteratorMode::Start)
        {
            item.map_err(|e| Error::db(e, "count pending uploads"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Forgets a pending upload (delivered or given up). Not synced: a
    /// process crash keeps it written; power loss may replay a delivered
    /// upload, which is harmless.
    pub fn delete_upload(&self, seq: u64, path: &[u8]) -> Result<()> {
        self.db
            .delete_cf(self.cf(Cf::Uploads), upload_key(seq, path))
            .map_err(|e| Error::db(e, "delete pending upload"))
    }

    /// The inode-number lease: every number at or above it is unused.
    pub fn ino_lease(&self) -> Result<u64> {
        let v = self
            .db
            .get_cf(self.cf(Cf::Meta), KEY_NEXT_INO)
            .map_err(|e| Error::db(e, "read next inode"))?;
        Ok(v.map(|v| u64_value(&v)).unwrap_or(Ino::FIRST_DYNAMIC.0))
    }

    /// Raises the inode-number lease. Not synced: a batch that uses a number
    /// below it is written to the log after this, so a crash that loses the
    /// lease loses every batch that used it too.
    pub fn put_ino_lease(&self, lease: u64) -> Result<()> {
        self.db
            .put_cf(self.cf(Cf::Meta), KEY_NEXT_INO, lease.to_le_bytes())
            .map_err(|e| Error::db(e, "write inode lease"))
    }

    /// True once a one-time conversion of an older store, named by `key`,
    /// has been done.
    pub fn converted(&self, key: &str) -> Result<bool> {
        let v = self
            .db
            .get_cf(self.cf(Cf::Meta), format!("converted:{key}"))
            .map_err(|e| Error::db(e, "read conversion marker"))?;
        Ok(v.is_some())
    }

    /// Records (synced) that the conversion `key` is done.
    pub fn mark_converted(&self, key: &str) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(self.cf(Cf::Meta), format!("converted:{key}"), [], &wo)
            .map_err(|e| Error::db(e, "write conversion marker"))
    }

    /// Persists the clock's lease (same ordering argument as the inode lease).
    pub fn put_clock_lease(&self, lease_ns: u64) -> Result<()> {
        self.db
            .put_cf(self.cf(Cf::Clock), KEY_LEASE, lease_ns.to_le_bytes())
            .map_err(|e| Error::db(e, "write clock lease"))
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
        self.db
            .put_cf_opt(self.cf(Cf::Meta), KEY_SYNC_MARKER, [], &wo)
            .map_err(|e| Error::db(e, "sync log"))
    }

    pub fn clock_lease(&self) -> Result<u64> {
        let v = self
            .db
            .get_cf(self.cf(Cf::Clock), KEY_LEASE)
            .map_err(|e| Error::db(e, "read clock"))?;
        Ok(v.map(|v| u64_value(&v)).unwrap_or(0))
    }

    pub fn gauges(&self) -> Result<StoreGauges> {
        let get = |key: &[u8]| -> Result<u64> {
            let v = self
                .db
                .get_cf(self.cf(Cf::Counters), key)
                .map_err(|e| Error::db(e, "read counters"))?;
            Ok(v.map_or(0, |v| i64_value(&v).max(0) as u64))
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
        let cf = self.cf(Cf::Counters);
        let Some(v) = self
            .db
            .get_cf(cf, KEY_GAUGES_RETIRED)
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let mut wb = WriteBatch::default();
        if v.len() >= 24 {
            wb.put_cf(cf, KEY_GAUGE_BLOBS, v[0..8].to_vec());
            wb.put_cf(cf, KEY_GAUGE_BYTES_STORED, v[8..16].to_vec());
            wb.put_cf(cf, KEY_GAUGE_BYTES_LOGICAL, v[16..24].to_vec());
        }
        wb.delete_cf(cf, KEY_GAUGES_RETIRED);
        self.db.write(wb).map_err(|e| e.to_string())?;
        self.db.flush_wal(true).map_err(|e| e.to_string())
    }

    /// Calls `f` on every raw record of a column family (fsck).
    pub fn scan(&self, cf: Cf, mut f: impl FnMut(&[u8], &[u8])) -> Result<()> {
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| Error::db(e, "scan"))?;
            f(&k, &v);
        }
        Ok(())
    }

    /// Calls `f` on every inode record (a full scan: eviction and fsck).
    pub fn for_each_inode(&self, mut f: impl FnMut(Result<Inode>)) -> Result<()> {
        for item in self
            .db
            .iterator_cf(self.cf(Cf::Inodes), IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| Error::db(e, "scan inodes"))?;
            let ino = Ino::from_key(&k);
            f(Inode::decode(ino, &v).ok_or_else(|| {
                Error::with_context(libc::EIO, format!("inode {ino} record is damaged"))
            }));
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.db
            .flush_wal(true)
            .map_err(|e| Error::db(e, "flush log"))
    }
}

/// One atomic change to the metadata.
pub struct Batch<'a> {
    store: &'a Store,
    wb: WriteBatch,
}

impl Batch<'_> {
    pub fn put_inode(&mut self, inode: &Inode) {
        self.wb
            .put_cf(self.store.cf(Cf::Inodes), inode.ino.key(), inode.encode());
    }
    pub fn delete_inode(&mut self, ino: Ino) {
        self.wb.delete_cf(self.store.cf(Cf::Inodes), ino.key());
    }
    pub fn put_dentry(&mut self, parent: Ino, name: &[u8], child: Ino) {
        self.wb.put_cf(
            self.store.cf(Cf::Dentries),
            dentry_key(parent, name),
            child.key(),
        );
    }
    pub fn delete_dentry(&mut self, parent: Ino, name: &[u8]) {
        self.wb
            .delete_cf(self.store.cf(Cf::Dentries), dentry_key(parent, name));
    }
    pub fn put_blob(&mut self, id: &BlobId, size: u64) {
        self.wb
            .put_cf(self.store.cf(Cf::Blobs), id.0, size.to_le_bytes());
    }
    pub fn delete_blob(&mut self, id: &BlobId) {
        self.wb.delete_cf(self.store.cf(Cf::Blobs), id.0);
    }
    pub fn put_blob_ref(&mut self, id: &BlobId, ino: Ino) {
        self.wb
            .put_cf(self.store.cf(Cf::BlobRefs), blob_ref_key(id, ino), []);
    }
    pub fn delete_blob_ref(&mut self, id: &BlobId, ino: Ino) {
        self.wb
            .delete_cf(self.store.cf(Cf::BlobRefs), blob_ref_key(id, ino));
    }
    pub fn put_pending(&mut self, ino: Ino, reason: PendingReason) {
        self.wb
            .put_cf(self.store.cf(Cf::Pending), ino.key(), [reason as u8]);
    }
    pub fn delete_pending(&mut self, ino: Ino) {
        self.wb.delete_cf(self.store.cf(Cf::Pending), ino.key());
    }
    /// Records a publication to deliver to the shared tier, in the batch
    /// that publishes it (so it is exactly as durable as the publication).
    pub fn put_upload(&mut self, up: &PendingUpload) {
        self.wb
            .put_cf(self.store.cf(Cf::Uploads), up.key(), up.encode());
    }
    /// Adds signed deltas to the store gauges (merge, no read).
    pub fn add_gauges(&mut self, blobs: i64, bytes_stored: i64, bytes_logical: i64) {
        let cf = self.store.cf(Cf::Counters);
        for (key, delta) in [
            (KEY_GAUGE_BLOBS, blobs),
            (KEY_GAUGE_BYTES_STORED, bytes_stored),
            (KEY_GAUGE_BYTES_LOGICAL, bytes_logical),
        ] {
            if delta != 0 {
                self.wb.merge_cf(cf, key, delta.to_le_bytes());
            }
        }
    }

    /// Applies the batch atomically. `sync` makes it durable against power
    /// loss before returning (a process crash never loses a written batch).
    pub fn commit(self, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.store
            .db
            .write_opt(self.wb, &wo)
            .map_err(|e| Error::db(e, "write batch"))
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
        assert_eq!(Inode::decode(Ino(42), &inode.encode()), Some(inode.clone()));
        let link = Inode {
            kind: Kind::Symlink,
            content: Content::Symlink(b"target".to_vec()),
            ..inode
        };
        assert_eq!(Inode::decode(Ino(42), &link.encode()), Some(link.clone()));
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
            assert_eq!(Inode::decode(Ino(42), &node.encode()), Some(node));
        }
        let touched = Inode {
            atime_ns: Some(7),
            mtime_set: true,
            links: vec![(Ino(3), b"other".to_vec()), (Ino(4), b"third".to_vec())],
            ..link
        };
        assert_eq!(Inode::decode(Ino(42), &touched.encode()), Some(touched));
        assert_eq!(Inode::decode(Ino(1), &[9, 9]), None);
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
            Some(up.clone())
        );
        assert_eq!(PendingUpload::decode(&up.key(), &[2]), None);
        assert!(upload_key(255, b"zz") < upload_key(256, b"aa"));
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
            store.db.drop_cf("uploads").unwrap();
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
