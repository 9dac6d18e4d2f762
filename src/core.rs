//! The filesystem core: every operation a cache directory needs, on the
//! metadata store and the blob files, with no knowledge of FUSE. The FUSE
//! adapter (`fuse.rs`) translates kernel requests into these calls.
//!
//! How bytes move:
//! - Every regular file is either *staged* (its bytes in `staging/<ino>`:
//!   being written, or a host-local file) or a *blob* (published, immutable,
//!   named by its hash).
//! - A staged file in a shared class (result, mutable, ccache-entry) is
//!   published when it is renamed or linked into such a name, or when the
//!   last writer closes a file created under its final name: hash, make the
//!   blob durable, link it into place, then commit the metadata (synced).
//!
//! Invariants (each kept by the code that names it):
//! - Atomic visibility: a file created under a create-only name is not
//!   bound to that name until it is published (`publish`); a shared name
//!   being rewritten in place is marked `Unsealed` and dropped after a crash.
//! - Create-only: binding onto an existing result keeps the existing one
//!   (`bind_published`), counts a conflict, and invalidates the kernel's
//!   view of the name.
//! - Open files are stable: a handle holds its own descriptor on the blob or
//!   staging file; an inode lives while it has a name, a handle or a kernel
//!   reference (`maybe_forget`).
//! - Every mtime and ctime comes from `Clock`.
//! - All metadata changes happen under `inner`'s lock, each in one batch.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use log::{debug, info, warn};

use crate::blobs::Blobs;
use crate::classes::{Class, Rules};
use crate::clock::Clock;
use crate::error::{enoent, Error, Result};
use crate::ids::{BlobId, Ino};
use crate::meta::{Batch, Content, Inode, Kind, PendingReason, Store};
use crate::shared::tier::{Tier, Upload};
use crate::shared::{Record, RecordKind};
use crate::stats::{Snapshot, Stats, StoreGauges};

/// Longest name component, as on Linux filesystems.
pub const NAME_BYTES_MAX: usize = 255;
/// Longest symlink target.
pub const SYMLINK_BYTES_MAX: usize = 4095;
/// Most entries one directory listing holds in memory.
pub const DIR_ENTRIES_MAX: usize = 1 << 20;
/// Free space kept back on the store's filesystem, as a fraction (1/N) of
/// its size, clamped to the bounds below: writers get ENOSPC before the
/// metadata database could run out of room for its own log and flushes.
const SPACE_RESERVE_DIVISOR: u64 = 100;
const SPACE_RESERVE_BYTES_MIN: u64 = 8 << 20;
const SPACE_RESERVE_BYTES_MAX: u64 = 128 << 20;
/// The statistics directory's name at the mount root.
pub const STATS_DIR_NAME: &[u8] = b".casfs";
const STATS_FILES: [(&[u8], Ino); 4] = [
    (b"sync", Ino::STATS_SYNC),
    (b"stats", Ino::STATS_TEXT),
    (b"stats.json", Ino::STATS_JSON),
    (b"metrics", Ino::STATS_METRICS),
];

/// Settings the core needs, validated by the command line.
pub struct Config {
    pub rules: Rules,
    /// Percentage (0..=100) of blob opens verified against the hash.
    pub verify_percent: u32,
    /// Serve hits, refuse every change with EROFS.
    pub read_only: bool,
    /// Make publications durable against power loss (fsync of blob,
    /// directory and metadata log). Always on for mounts; off only when
    /// generating benchmark stores.
    pub durable: bool,
    /// Owner, group and mode to give the mount root at start.
    pub root_uid: Option<u32>,
    pub root_gid: Option<u32>,
    pub root_mode: Option<u32>,
}

/// Most eviction candidates one pass of `evict` collects (the oldest ones).
pub const EVICT_BATCH_MAX: usize = 4096;

/// Attributes of one inode, as the kernel sees them.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub mtime_ns: u64,
    pub ctime_ns: u64,
    /// False while the name is not yet bound (the kernel must not cache it).
    pub cacheable: bool,
}

/// What changed in a `setattr`.
#[derive(Default, Debug)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// Any atime or mtime change: a touch on the daemon's clock.
    pub touch: bool,
}

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Something the kernel may have cached that the daemon changed on its own
/// (not through the request the kernel sent); the adapter tells the kernel
/// after the current request is answered.
#[derive(Debug)]
pub enum Invalidate {
    /// A name (positive or negative entry).
    Entry(Ino, Vec<u8>),
    /// An inode's attributes.
    Attr(Ino),
    /// An inode's attributes and cached pages.
    Data(Ino),
}

/// The kernel's caches as the core sees them; the FUSE adapter implements it.
pub trait KernelCache: Send + Sync {
    /// Tells the kernel now. Called by `send_urgent_invalidations` with no
    /// core lock held, before the current request is answered.
    fn invalidate_now(&self, inv: &Invalidate);
    /// Tells the kernel once the current request is answered (names: the
    /// kernel may hold the directory's lock until then).
    fn invalidate_later(&self, inv: Invalidate);
}

/// One directory entry in a listing.
pub struct DirEntry {
    pub ino: Ino,
    pub kind: Kind,
    pub name: Vec<u8>,
}

pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Read,
    /// Writes go to the staging file.
    Write,
    /// A write open of a published result: reads see the result, writes are
    /// accepted and discarded (create-only), counted once as a conflict.
    Discard,
}

struct Handle {
    ino: Ino,
    mode: Mode,
    /// The blob or staging file. Replaced when a write arrives after the
    /// handle's bytes were published (`restage`).
    file: RwLock<Option<File>>,
    /// Rendered statistics for the virtual files.
    virt: Option<Vec<u8>>,
    /// Set when this handle's bytes were published at close while the
    /// handle stays open (a duplicated descriptor): a later write through it
    /// starts a new version (`restage`) instead of touching the blob.
    published: AtomicBool,
    dirty: AtomicBool,
    conflict_counted: AtomicBool,
    /// For a read of a published result: its blob, which never changes,
    /// so the kernel may read the blob file directly (passthrough).
    immutable_blob: Option<BlobId>,
}

#[derive(Default)]
struct OpenCount {
    handles: u32,
    writers: u32,
}

struct Inner {
    next_ino: u64,
    next_fh: u64,
    gauges: StoreGauges,
    /// Kernel references (lookup counts) per inode.
    nlookup: HashMap<Ino, u64>,
    open: HashMap<Ino, OpenCount>,
    handles: HashMap<u64, Arc<Handle>>,
    dirs: HashMap<u64, Arc<Vec<DirEntry>>>,
    /// Files created under a create-only name, bound when they are
    /// published at close (not persisted: a crash drops them).
    awaiting_bind: HashSet<Ino>,
}

pub struct Core {
    store: Store,
    blobs: Blobs,
    clock: Clock,
    config: Config,
    pub stats: Stats,
    inner: Mutex<Inner>,
    kernel: OnceLock<Box<dyn KernelCache>>,
    /// The shared tier, when `--shared` is given.
    tier: OnceLock<Arc<Tier>>,
    open_counter: AtomicU64,
    /// Wall second of the last "disk full" warning, to log it once a minute.
    full_warned_s: AtomicU64,
}

thread_local! {
    /// Invalidations the kernel must get before the current request is
    /// answered; see `Core::send_urgent_invalidations`.
    static URGENT: std::cell::RefCell<Vec<Invalidate>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Work to do once a batch is committed.
enum After {
    RemoveBlob(BlobId),
    RemoveStaging(Ino),
    /// After the reply: for names, whose directory the kernel may hold
    /// locked until the request is answered.
    Invalidate(Invalidate),
    /// Before the reply (see `send_urgent_invalidations`).
    InvalidateNow(Invalidate),
    /// Share a publication (queued; never waits on the network).
    Upload(Upload),
}

/// One metadata change being assembled: the batch plus what it implies.
struct Txn<'a> {
    batch: Batch<'a>,
    gauges: StoreGauges,
    added_refs: Vec<(BlobId, Ino)>,
    removed_refs: Vec<(BlobId, Ino)>,
    new_blobs: Vec<BlobId>,
    after: Vec<After>,
    lease: Option<u64>,
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_BYTES_MAX {
        return Err(Error::errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Error::errno(libc::EINVAL));
    }
    Ok(())
}

fn is_stats_name(parent: Ino, name: &[u8]) -> bool {
    parent == Ino::ROOT && name == STATS_DIR_NAME
}

impl Core {
    /// Opens the core on a store: recovers from a crash (drops what was
    /// never published), and makes the root directory if the store is new.
    pub fn start(store: Store, config: Config) -> Result<Core> {
        let clock = Clock::start(store.clock_lease()?);
        let inner = Inner {
            next_ino: store.next_ino()?,
            next_fh: 1,
            gauges: store.gauges()?,
            nlookup: HashMap::new(),
            open: HashMap::new(),
            handles: HashMap::new(),
            dirs: HashMap::new(),
            awaiting_bind: HashSet::new(),
        };
        let blobs = Blobs::new(&store.root, config.durable);
        let core = Core {
            store,
            blobs,
            clock,
            config,
            stats: Stats::default(),
            inner: Mutex::new(inner),
            kernel: OnceLock::new(),
            tier: OnceLock::new(),
            open_counter: AtomicU64::new(0),
            full_warned_s: AtomicU64::new(0),
        };
        core.ensure_root()?;
        if !core.config.read_only {
            core.recover()?;
            core.apply_root_settings()?;
        }
        Ok(core)
    }

    fn apply_root_settings(&self) -> Result<()> {
        let c = &self.config;
        if c.root_uid.is_none() && c.root_gid.is_none() && c.root_mode.is_none() {
            return Ok(());
        }
        let set = SetAttr {
            mode: c.root_mode,
            uid: c.root_uid,
            gid: c.root_gid,
            ..Default::default()
        };
        self.setattr(Ino::ROOT, set).map(|_| ())
    }

    /// Refuses changes on a read-only mount.
    fn writable(&self) -> Result<()> {
        if self.config.read_only {
            return Err(Error::errno(libc::EROFS));
        }
        Ok(())
    }

    /// Sends the invalidations the last call on this thread made urgent: the
    /// adapter calls this after the core returns and before it replies, so
    /// no core lock is held (the kernel may wait on another request, which
    /// needs the core) and the kernel is told before the caller goes on.
    pub fn send_urgent_invalidations(&self) {
        let urgent = URGENT.with(|u| std::mem::take(&mut *u.borrow_mut()));
        if let Some(k) = self.kernel.get() {
            for inv in &urgent {
                k.invalidate_now(inv);
            }
        }
    }

    /// Connects the core to a shared tier (once, at mount).
    pub fn attach_tier(&self, tier: Arc<Tier>) {
        if self.tier.set(tier).is_err() {
            warn!("shared tier attached twice; keeping the first");
        }
    }

    /// How long the kernel may trust that a name does not exist: long on
    /// a host alone; with a shared tier, as long as the tier's own "missing"
    /// answers, so names other hosts publish show up.
    pub fn negative_ttl(&self) -> Option<std::time::Duration> {
        self.tier
            .get()
            .map(|_| std::time::Duration::from_millis(crate::shared::tier::NEGATIVE_TTL_MS))
    }

    /// Queues the upload of a published name (a no-op without a tier).
    fn share(&self, txn: &mut Txn, inode: &Inode) -> Result<()> {
        if self.tier.get().is_none() || !inode.class.is_blob() {
            return Ok(());
        }
        let Content::Blob(id) = inode.content else {
            return Ok(());
        };
        let path = self.path_of(inode.parent, &inode.name)?.join(&b'/');
        let record = Record {
            kind: RecordKind::File {
                blob: id,
                size: inode.size,
                mode: inode.perm,
            },
            mtime_ns: inode.mtime_ns,
        };
        let create_only = inode.class == Class::Result;
        txn.after.push(After::Upload(Upload {
            path,
            record,
            create_only,
            blob_file: self.blobs.blob_path(&id),
            blob: id,
        }));
        Ok(())
    }

    /// Finds the inode bound at a path below the root.
    fn resolve_path(&self, path: &[u8]) -> Result<Option<(Ino, Vec<u8>, Ino)>> {
        let mut parent = Ino::ROOT;
        let parts: Vec<&[u8]> = path.split(|c| *c == b'/').collect();
        for (i, part) in parts.iter().enumerate() {
            let Some(child) = self.store.dentry(parent, part)? else {
                return Ok(None);
            };
            if i + 1 == parts.len() {
                return Ok(Some((parent, part.to_vec(), child)));
            }
            parent = child;
        }
        Ok(None)
    }

    /// Another host published a different result under `path` first: the
    /// shared tier keeps theirs, so this host takes it too (called on an
    /// upload thread).
    pub fn adopt_winner(&self, path: &[u8], winner: Record) {
        let Some(tier) = self.tier.get() else { return };
        let RecordKind::File { blob, size, .. } = winner.kind else {
            return;
        };
        let Some(bytes) = tier.fetch_blob(blob) else {
            warn!(
                "converge {:?}: cannot fetch the winner's blob {blob}; keeping ours for now",
                String::from_utf8_lossy(path)
            );
            return;
        };
        let result = (|| -> Result<()> {
            let Some((parent, name, ino)) = self.resolve_path(path)? else {
                return Ok(());
            };
            let mut inner = self.inner.lock().unwrap();
            let Some(mut inode) = self.store.inode(ino)? else {
                return Ok(());
            };
            if !Self::is_published_result(&inode) || inode.content == Content::Blob(blob) {
                return Ok(());
            }
            let mut txn = self.txn(&inner);
            self.install_bytes(&mut txn, &bytes, blob)?;
            if let Content::Blob(old) = inode.content {
                self.drop_ref(&mut txn, old, ino, inode.size)?;
            }
            self.add_ref(&mut txn, blob, ino, size);
            self.clock.observe(winner.mtime_ns);
            inode.content = Content::Blob(blob);
            inode.size = size;
            inode.mtime_ns = inode.mtime_ns.max(winner.mtime_ns);
            inode.ctime_ns = self.tick(&mut txn);
            txn.batch.put_inode(&inode);
            txn.after.push(After::InvalidateNow(Invalidate::Data(ino)));
            txn.after
                .push(After::Invalidate(Invalidate::Entry(parent, name.clone())));
            self.commit_locked(&mut inner, txn, true)?;
            info!(
                "converge {:?}: another host published it first; now serving its blob {blob}",
                String::from_utf8_lossy(path)
            );
            Ok(())
        })();
        self.send_urgent_invalidations();
        if let Err(e) = result {
            warn!("converge {:?}: {e}", String::from_utf8_lossy(path));
        }
    }

    /// Stores fetched bytes (already verified against `id`) as a local blob.
    fn install_bytes(&self, txn: &mut Txn, bytes: &[u8], id: BlobId) -> Result<()> {
        if self.store.blob_known(&id)? || txn.new_blobs.contains(&id) {
            return Ok(());
        }
        let n = self.open_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.blobs.staging_dir().join(format!("fetch-{n}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(e, "create fetched blob"))?;
        let result = file
            .write_all_at(bytes, 0)
            .map_err(|e| Error::io(e, "write fetched blob"))
            .and_then(|_| self.blobs.install_copy(&tmp, &file, &id));
        let _ = std::fs::remove_file(&tmp);
        result?;
        txn.batch.put_blob(&id, bytes.len() as u64);
        txn.new_blobs.push(id);
        txn.gauges.blobs += 1;
        txn.gauges.bytes_stored += bytes.len() as u64;
        Ok(())
    }

    /// A lookup that missed locally asks the shared tier; what it finds
    /// (verified) becomes a local name, so the next hit is local.
    fn lookup_shared(&self, parent: Ino, name: &[u8]) -> Result<Option<Inode>> {
        let Some(tier) = self.tier.get() else {
            return Ok(None);
        };
        let parts = self.path_of(parent, name)?;
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let class = self.config.rules.classify(&refs);
        if class == Class::Local {
            return Ok(None);
        }
        let path = parts.join(&b'/');
        let Some((record, bytes)) = tier.fetch(&path) else {
            return Ok(None);
        };
        self.clock.observe(record.mtime_ns);
        let mut inner = self.inner.lock().unwrap();
        if let Some(ino) = self.store.dentry(parent, name)? {
            return self.store.inode(ino); // appeared meanwhile
        }
        let dir = self.inode(parent)?;
        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        let ino = self.alloc_ino(&mut inner, &mut txn);
        let owner = Caller {
            uid: dir.uid,
            gid: dir.gid,
        };
        let inode = match (&record.kind, bytes) {
            (RecordKind::Dir, _) => {
                let mut d = self.new_inode(
                    ino,
                    Kind::Dir,
                    Class::Local,
                    dir.perm & 0o7777,
                    owner,
                    &dir,
                    name,
                    now,
                );
                d.mtime_ns = record.mtime_ns.min(now);
                d
            }
            (RecordKind::File { blob, size, mode }, Some(bytes)) => {
                self.install_bytes(&mut txn, &bytes, *blob)?;
                let mut f = self.new_inode(
                    ino,
                    Kind::File,
                    class.resolve(&bytes[..bytes.len().min(4)]),
                    *mode,
                    owner,
                    &dir,
                    name,
                    now,
                );
                f.content = Content::Blob(*blob);
                f.size = *size;
                f.mtime_ns = record.mtime_ns;
                self.add_ref(&mut txn, *blob, ino, *size);
                f
            }
            (RecordKind::File { .. }, None) => return Ok(None),
        };
        txn.batch.put_inode(&inode);
        txn.batch.put_dentry(parent, name, ino);
        self.commit_locked(&mut inner, txn, false)?;
        debug!(
            "fetch name={:?} ino={ino} from the shared tier",
            String::from_utf8_lossy(name)
        );
        Ok(Some(inode))
    }

    /// Connects the core to the kernel's caches (once, at mount).
    pub fn set_kernel_cache(&self, kernel: Box<dyn KernelCache>) {
        if self.kernel.set(kernel).is_err() {
            warn!("kernel cache connected twice; keeping the first");
        }
    }

    fn ensure_root(&self) -> Result<()> {
        if self.store.inode(Ino::ROOT)?.is_some() {
            return Ok(());
        }
        let mut inner = self.inner.lock().unwrap();
        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        let root = Inode {
            ino: Ino::ROOT,
            kind: Kind::Dir,
            class: Class::Local,
            perm: 0o755,
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            nlink: 2,
            size: 0,
            mtime_ns: now,
            ctime_ns: now,
            parent: Ino::ROOT,
            name: Vec::new(),
            content: Content::None,
        };
        txn.batch.put_inode(&root);
        self.commit_locked(&mut inner, txn, true)
    }

    /// Crash recovery: inodes that were never bound, or bound while still
    /// being written, are dropped; staging files nobody owns are removed.
    fn recover(&self) -> Result<()> {
        let pending = self.store.pending()?;
        let mut inner = self.inner.lock().unwrap();
        let mut txn = self.txn(&inner);
        for (ino, reason) in &pending {
            txn.batch.delete_pending(*ino);
            let Some(inode) = self.store.inode(*ino)? else {
                continue;
            };
            if *reason == PendingReason::Unsealed
                && self.store.dentry(inode.parent, &inode.name)? == Some(*ino)
            {
                txn.batch.delete_dentry(inode.parent, &inode.name);
            }
            self.delete_inode(&mut txn, &inode)?;
        }
        if !pending.is_empty() {
            info!(
                "recovery: dropped {} unpublished or unfinished files",
                pending.len()
            );
        }
        self.commit_locked(&mut inner, txn, true)?;
        drop(inner);
        for (name, path) in self.blobs.staging_files() {
            let owned = match name.parse::<u64>() {
                Ok(n) => {
                    matches!(self.store.inode(Ino(n))?, Some(i) if i.content == Content::Staged)
                }
                Err(_) => false,
            };
            if !owned {
                debug!("recovery: remove orphan staging file {}", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    // ----- transactions -------------------------------------------------

    fn txn<'a>(&'a self, inner: &Inner) -> Txn<'a> {
        Txn {
            batch: self.store.batch(),
            gauges: inner.gauges,
            added_refs: Vec::new(),
            removed_refs: Vec::new(),
            new_blobs: Vec::new(),
            after: Vec::new(),
            lease: None,
        }
    }

    fn tick(&self, txn: &mut Txn) -> u64 {
        let t = self.clock.tick();
        if let Some(lease) = t.new_lease_ns {
            txn.lease = Some(lease);
        }
        t.ns
    }

    /// Commits a batch (callers hold `inner`), then does what it implies.
    fn commit_locked(&self, inner: &mut Inner, mut txn: Txn, sync: bool) -> Result<()> {
        if let Some(lease) = txn.lease {
            txn.batch.put_clock_lease(lease);
        }
        txn.batch.put_gauges(&txn.gauges);
        let gauges = txn.gauges;
        txn.batch
            .commit(sync && self.config.durable)
            .map_err(|e| self.count_error(e))?;
        inner.gauges = gauges;
        for a in txn.after {
            match a {
                After::RemoveBlob(id) => self.blobs.remove_blob(&id),
                After::RemoveStaging(ino) => self.blobs.remove_staging(ino),
                After::Invalidate(inv) => {
                    if let Some(k) = self.kernel.get() {
                        k.invalidate_later(inv)
                    }
                }
                After::InvalidateNow(inv) => URGENT.with(|u| u.borrow_mut().push(inv)),
                After::Upload(up) => {
                    if let Some(t) = self.tier.get() {
                        t.enqueue(up)
                    }
                }
            }
        }
        Ok(())
    }

    fn count_error(&self, e: Error) -> Error {
        if e.is_operating_error() {
            Stats::bump(&self.stats.counters.errors);
            warn!("{e}");
        }
        e
    }

    fn alloc_ino(&self, inner: &mut Inner, txn: &mut Txn) -> Ino {
        let ino = Ino(inner.next_ino);
        inner.next_ino += 1;
        txn.batch.put_next_ino(inner.next_ino);
        ino
    }

    fn add_ref(&self, txn: &mut Txn, id: BlobId, ino: Ino, size: u64) {
        txn.batch.put_blob_ref(&id, ino);
        txn.added_refs.push((id, ino));
        txn.gauges.bytes_logical += size;
    }

    /// Drops `ino`'s reference to `id`, and the blob itself if that was the
    /// last one (its file is removed after the commit).
    fn drop_ref(&self, txn: &mut Txn, id: BlobId, ino: Ino, size: u64) -> Result<()> {
        txn.batch.delete_blob_ref(&id, ino);
        txn.removed_refs.push((id, ino));
        txn.gauges.bytes_logical = txn.gauges.bytes_logical.saturating_sub(size);
        let others = self.store.blob_refs(&id, 8)?;
        let still_used = others.iter().any(|o| !txn.removed_refs.contains(&(id, *o)))
            || txn
                .added_refs
                .iter()
                .any(|(a, i)| *a == id && !txn.removed_refs.contains(&(id, *i)));
        if !still_used && !txn.new_blobs.contains(&id) {
            txn.batch.delete_blob(&id);
            txn.gauges.blobs = txn.gauges.blobs.saturating_sub(1);
            txn.gauges.bytes_stored = txn.gauges.bytes_stored.saturating_sub(size);
            txn.after.push(After::RemoveBlob(id));
        }
        Ok(())
    }

    /// Removes an inode record and its content.
    fn delete_inode(&self, txn: &mut Txn, inode: &Inode) -> Result<()> {
        txn.batch.delete_inode(inode.ino);
        txn.batch.delete_pending(inode.ino);
        match &inode.content {
            Content::Blob(id) => self.drop_ref(txn, *id, inode.ino, inode.size)?,
            Content::Staged => txn.after.push(After::RemoveStaging(inode.ino)),
            Content::None | Content::Symlink(_) => {}
        }
        Ok(())
    }

    /// Removes one name of `inode`; the inode goes when nothing uses it.
    fn unbind(
        &self,
        inner: &Inner,
        txn: &mut Txn,
        parent: Ino,
        name: &[u8],
        mut inode: Inode,
    ) -> Result<()> {
        txn.batch.delete_dentry(parent, name);
        inode.nlink = inode
            .nlink
            .saturating_sub(if inode.kind == Kind::Dir { 2 } else { 1 });
        if inode.nlink == 0 {
            if self.in_use(inner, inode.ino) {
                txn.batch.put_pending(inode.ino, PendingReason::Unbound);
                inode.ctime_ns = self.tick(txn);
                txn.batch.put_inode(&inode);
            } else {
                self.delete_inode(txn, &inode)?;
            }
        } else {
            inode.ctime_ns = self.tick(txn);
            txn.batch.put_inode(&inode);
        }
        Ok(())
    }

    fn in_use(&self, inner: &Inner, ino: Ino) -> bool {
        inner.open.get(&ino).is_some_and(|o| o.handles > 0)
            || inner.nlookup.get(&ino).is_some_and(|n| *n > 0)
    }

    /// Deletes an unbound inode once neither a handle nor the kernel holds it.
    fn maybe_forget(&self, inner: &mut Inner, ino: Ino) -> Result<()> {
        if ino.is_virtual() || ino == Ino::ROOT || self.in_use(inner, ino) {
            return Ok(());
        }
        let Some(inode) = self.store.inode(ino)? else {
            return Ok(());
        };
        if inode.nlink > 0 {
            return Ok(());
        }
        let mut txn = self.txn(inner);
        self.delete_inode(&mut txn, &inode)?;
        self.commit_locked(inner, txn, false)
    }

    // ----- lookups and attributes ------------------------------------------

    fn inode(&self, ino: Ino) -> Result<Inode> {
        match self.store.inode(ino)? {
            Some(i) => Ok(i),
            None => enoent(),
        }
    }

    fn attr_of(&self, inode: &Inode) -> Attr {
        let size = match (&inode.content, inode.kind) {
            (Content::Staged, _) => std::fs::metadata(self.blobs.staging_path(inode.ino))
                .map(|m| m.size())
                .unwrap_or(inode.size),
            (Content::Symlink(t), _) => t.len() as u64,
            _ => inode.size,
        };
        Attr {
            ino: inode.ino,
            kind: inode.kind,
            perm: inode.perm,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink.max(1),
            size,
            mtime_ns: inode.mtime_ns,
            ctime_ns: inode.ctime_ns,
            cacheable: inode.nlink > 0,
        }
    }

    fn virtual_attr(&self, ino: Ino) -> Attr {
        let (kind, perm, size) = if ino == Ino::STATS_DIR {
            (Kind::Dir, 0o555, 0)
        } else if ino == Ino::STATS_SYNC {
            (Kind::File, 0o444, 0)
        } else {
            (Kind::File, 0o444, self.render(ino).len() as u64)
        };
        let t = self.clock.last_ns();
        Attr {
            ino,
            kind,
            perm,
            uid: 0,
            gid: 0,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size,
            mtime_ns: t,
            ctime_ns: t,
            cacheable: false,
        }
    }

    /// How long reading `.casfs/sync` waits for uploads at most.
    const SYNC_WAIT_S: u64 = 300;

    fn render(&self, ino: Ino) -> Vec<u8> {
        if ino == Ino::STATS_SYNC {
            let text = match self.tier.get() {
                None => "ok: no shared tier\n".to_string(),
                Some(t) => match t.sync(std::time::Duration::from_secs(Self::SYNC_WAIT_S)) {
                    Ok(n) => format!("ok: {n} uploads delivered to {}\n", t.describe()),
                    Err(e) => format!("FAILED: {e}\n"),
                },
            };
            return text.into_bytes();
        }
        let mut snap = Snapshot {
            gauges: self.inner.lock().unwrap().gauges,
            ..Default::default()
        };
        if let Some(t) = self.tier.get() {
            t.snapshot(&mut snap);
        }
        match ino {
            Ino::STATS_TEXT => self.stats.render_text(&snap),
            Ino::STATS_JSON => self.stats.render_json(&snap),
            _ => self.stats.render_prometheus(&snap),
        }
        .into_bytes()
    }

    fn remember(&self, ino: Ino) {
        if !ino.is_virtual() {
            *self.inner.lock().unwrap().nlookup.entry(ino).or_insert(0) += 1;
        }
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        Stats::bump(&self.stats.counters.lookups);
        if name.len() > NAME_BYTES_MAX {
            return Err(Error::errno(libc::ENAMETOOLONG));
        }
        if is_stats_name(parent, name) {
            return Ok(self.virtual_attr(Ino::STATS_DIR));
        }
        if parent == Ino::STATS_DIR {
            return match STATS_FILES.iter().find(|(n, _)| *n == name) {
                Some((_, ino)) => Ok(self.virtual_attr(*ino)),
                None => enoent(),
            };
        }
        let found = match self.store.dentry(parent, name)? {
            Some(ino) => self.store.inode(ino)?,
            None => None,
        };
        match found {
            Some(inode) => {
                self.remember(inode.ino);
                Ok(self.attr_of(&inode))
            }
            None => {
                if self.store.inode(parent)?.is_none() {
                    return enoent();
                }
                if let Some(inode) = self.lookup_shared(parent, name)? {
                    self.remember(inode.ino);
                    return Ok(self.attr_of(&inode));
                }
                Stats::bump(&self.stats.counters.misses);
                enoent()
            }
        }
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(count) = inner.nlookup.get_mut(&ino) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                inner.nlookup.remove(&ino);
                if let Err(e) = self.maybe_forget(&mut inner, ino) {
                    warn!("forget ino={ino}: {e}");
                }
            }
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        if ino.is_virtual() {
            return Ok(self.virtual_attr(ino));
        }
        Ok(self.attr_of(&self.inode(ino)?))
    }

    fn refuse_virtual(ino: Ino) -> Result<()> {
        if ino.is_virtual() {
            return Err(Error::errno(libc::EROFS));
        }
        Ok(())
    }

    pub fn setattr(&self, ino: Ino, set: SetAttr) -> Result<Attr> {
        Self::refuse_virtual(ino)?;
        self.writable()?;
        let mut inner = self.inner.lock().unwrap();
        let mut inode = self.inode(ino)?;
        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        if let Some(mode) = set.mode {
            inode.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            inode.uid = uid;
        }
        if let Some(gid) = set.gid {
            inode.gid = gid;
        }
        if let Some(size) = set.size {
            if inode.kind == Kind::Dir {
                return Err(Error::errno(libc::EISDIR));
            }
            match (&inode.content, inode.class) {
                (Content::Blob(_), Class::Result) => {
                    // Create-only: a published result's bytes never change.
                    Stats::bump(&self.stats.counters.conflicts);
                    debug!("truncate ino={ino} outcome=kept-existing-result");
                }
                (Content::Blob(_), _) => {
                    self.copy_up(&mut txn, &mut inode, Some(size))?;
                    inode.mtime_ns = now;
                }
                (Content::Staged, _) => {
                    let f = self.blobs.open_staging(ino, true)?;
                    f.set_len(size).map_err(|e| Error::io(e, "truncate"))?;
                    inode.size = size;
                    inode.mtime_ns = now;
                }
                _ => return Err(Error::errno(libc::EINVAL)),
            }
        }
        if set.touch {
            inode.mtime_ns = now;
        }
        inode.ctime_ns = now;
        txn.batch.put_inode(&inode);
        self.commit_locked(&mut inner, txn, false)?;
        drop(inner);
        self.publish_if_idle(ino)?;
        Ok(self.attr_of(&self.inode(ino)?))
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        match self.inode(ino)?.content {
            Content::Symlink(t) => Ok(t),
            _ => Err(Error::errno(libc::EINVAL)),
        }
    }

    pub fn access(&self, ino: Ino) -> Result<()> {
        if !ino.is_virtual() {
            self.inode(ino)?;
        }
        Ok(())
    }

    /// Refuses new bytes when the store's filesystem is down to its reserve.
    fn check_space(&self) -> Result<()> {
        let s = self.statfs()?;
        let total = s.blocks * s.bsize as u64;
        let free = s.bavail * s.bsize as u64;
        let reserve =
            (total / SPACE_RESERVE_DIVISOR).clamp(SPACE_RESERVE_BYTES_MIN, SPACE_RESERVE_BYTES_MAX);
        if free >= reserve {
            return Ok(());
        }
        Stats::bump(&self.stats.counters.errors);
        let now_s = crate::clock::wall_ns() / 1_000_000_000;
        if now_s >= self.full_warned_s.load(Ordering::Relaxed) + 60 {
            self.full_warned_s.store(now_s, Ordering::Relaxed);
            warn!(
                "store {} is full ({free} bytes free, {reserve} kept in reserve): writes get ENOSPC, reads go on",
                self.store.root.display()
            );
        }
        Err(Error::errno(libc::ENOSPC))
    }

    pub fn statfs(&self) -> Result<Statfs> {
        let path = std::ffi::CString::new(self.store.root.as_os_str().as_encoded_bytes()).unwrap();
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return Err(Error::io(
                std::io::Error::last_os_error(),
                "statfs of the store",
            ));
        }
        Ok(Statfs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_frsize as u32,
        })
    }

    // ----- namespace changes ------------------------------------------------

    /// The path components of `name` in `parent`, below the mount root.
    fn path_of(&self, parent: Ino, name: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut parts = vec![name.to_vec()];
        let mut at = parent;
        let mut depth = 0;
        while at != Ino::ROOT {
            let dir = self.inode(at)?;
            parts.push(dir.name.clone());
            at = dir.parent;
            depth += 1;
            if depth > 4096 {
                return Err(Error::with_context(
                    libc::EIO,
                    format!("directory loop above ino {parent}"),
                ));
            }
        }
        parts.reverse();
        Ok(parts)
    }

    fn class_of(&self, parent: Ino, name: &[u8]) -> Result<Class> {
        let parts = self.path_of(parent, name)?;
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        Ok(self.config.rules.classify(&refs))
    }

    /// Checks that `parent` is a writable directory of ours and `name` is
    /// a name we may create there.
    fn check_new_name(&self, parent: Ino, name: &[u8]) -> Result<Inode> {
        if parent.is_virtual() {
            return Err(Error::errno(libc::EROFS));
        }
        self.writable()?;
        check_name(name)?;
        if is_stats_name(parent, name) {
            return Err(Error::errno(libc::EEXIST));
        }
        let dir = self.inode(parent)?;
        if dir.kind != Kind::Dir {
            return Err(Error::errno(libc::ENOTDIR));
        }
        Ok(dir)
    }

    fn new_inode(
        &self,
        ino: Ino,
        kind: Kind,
        class: Class,
        perm: u16,
        caller: Caller,
        dir: &Inode,
        name: &[u8],
        now: u64,
    ) -> Inode {
        // A setgid directory hands its group (and, to subdirectories, the bit) down.
        let setgid = dir.perm & 0o2000 != 0;
        let gid = if setgid { dir.gid } else { caller.gid };
        let perm = if setgid && kind == Kind::Dir {
            perm | 0o2000
        } else {
            perm
        };
        Inode {
            ino,
            kind,
            class,
            perm,
            uid: caller.uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            mtime_ns: now,
            ctime_ns: now,
            parent: dir.ino,
            name: name.to_vec(),
            content: Content::None,
        }
    }

    fn touch_dir(&self, txn: &mut Txn, mut dir: Inode, now: u64) {
        dir.mtime_ns = now;
        dir.ctime_ns = now;
        txn.batch.put_inode(&dir);
    }

    pub fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, caller: Caller) -> Result<Attr> {
        let dir = self.check_new_name(parent, name)?;
        let mut inner = self.inner.lock().unwrap();
        if self.store.dentry(parent, name)?.is_some() {
            return Err(Error::errno(libc::EEXIST));
        }
        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        let ino = self.alloc_ino(&mut inner, &mut txn);
        let inode = self.new_inode(
            ino,
            Kind::Dir,
            Class::Local,
            (mode & 0o7777) as u16,
            caller,
            &dir,
            name,
            now,
        );
        txn.batch.put_inode(&inode);
        txn.batch.put_dentry(parent, name, ino);
        self.touch_dir(&mut txn, dir, now);
        self.commit_locked(&mut inner, txn, false)?;
        *inner.nlookup.entry(ino).or_insert(0) += 1;
        Ok(self.attr_of(&inode))
    }

    pub fn symlink(&self, parent: Ino, name: &[u8], target: &[u8], caller: Caller) -> Result<Attr> {
        let dir = self.check_new_name(parent, name)?;
        if target.len() > SYMLINK_BYTES_MAX {
            return Err(Error::errno(libc::ENAMETOOLONG));
        }
        let mut inner = self.inner.lock().unwrap();
        if self.store.dentry(parent, name)?.is_some() {
            return Err(Error::errno(libc::EEXIST));
        }
        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        let ino = self.alloc_ino(&mut inner, &mut txn);
        let mut inode = self.new_inode(
            ino,
            Kind::Symlink,
            Class::Local,
            0o777,
            caller,
            &dir,
            name,
            now,
        );
        inode.content = Content::Symlink(target.to_vec());
        txn.batch.put_inode(&inode);
        txn.batch.put_dentry(parent, name, ino);
        self.touch_dir(&mut txn, dir, now);
        self.commit_locked(&mut inner, txn, false)?;
        *inner.nlookup.entry(ino).or_insert(0) += 1;
        Ok(self.attr_of(&inode))
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: Ino, name: &[u8], dir_wanted: bool) -> Result<()> {
        if parent.is_virtual() || is_stats_name(parent, name) {
            return Err(Error::errno(libc::EPERM));
        }
        self.writable()?;
        if name.len() > NAME_BYTES_MAX {
            return Err(Error::errno(libc::ENAMETOOLONG));
        }
        let mut inner = self.inner.lock().unwrap();
        let Some(ino) = self.store.dentry(parent, name)? else {
            return enoent();
        };
        let inode = self.inode(ino)?;
        match (inode.kind == Kind::Dir, dir_wanted) {
            (true, false) => return Err(Error::errno(libc::EISDIR)),
            (false, true) => return Err(Error::errno(libc::ENOTDIR)),
            (true, true) if !self.store.dir_is_empty(ino)? => {
                return Err(Error::errno(libc::ENOTEMPTY))
            }
            _ => {}
        }
        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        self.unbind(&inner, &mut txn, parent, name, inode)?;
        self.touch_dir(&mut txn, self.inode(parent)?, now);
        self.commit_locked(&mut inner, txn, false)
    }

    /// Reads the first bytes of a file's content (for header-decided classes).
    fn head_of(&self, inode: &Inode) -> [u8; 4] {
        let mut head = [0u8; 4];
        let file = match &inode.content {
            Content::Staged => self.blobs.open_staging(inode.ino, false).ok(),
            Content::Blob(id) => self.blobs.open_blob(id).ok(),
            _ => None,
        };
        if let Some(f) = file {
            let _ = f.read_at(&mut head, 0);
        }
        head
    }

    /// True if `existing` is a published result that a new binding of that
    /// name must leave in place.
    fn is_published_result(existing: &Inode) -> bool {
        existing.kind == Kind::File
            && existing.class == Class::Result
            && matches!(existing.content, Content::Blob(_))
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(Error::errno(libc::EINVAL));
        }
        if parent.is_virtual() || newparent.is_virtual() || is_stats_name(parent, name) {
            return Err(Error::errno(libc::EPERM));
        }
        if name.len() > NAME_BYTES_MAX {
            return Err(Error::errno(libc::ENAMETOOLONG));
        }
        let newdir = self.check_new_name(newparent, newname)?;
        let mut inner = self.inner.lock().unwrap();
        let Some(src_ino) = self.store.dentry(parent, name)? else {
            return enoent();
        };
        let mut src = self.inode(src_ino)?;
        let dst = match self.store.dentry(newparent, newname)? {
            Some(d) => Some(self.inode(d)?),
            None => None,
        };
        if let Some(d) = &dst {
            if d.ino == src_ino {
                return Ok(());
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Error::errno(libc::EEXIST));
            }
            match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                (false, true) => return Err(Error::errno(libc::EISDIR)),
                (true, false) => return Err(Error::errno(libc::ENOTDIR)),
                (true, true) if !self.store.dir_is_empty(d.ino)? => {
                    return Err(Error::errno(libc::ENOTEMPTY))
                }
                _ => {}
            }
        }
        if src.kind == Kind::Dir {
            // Not into its own subtree.
            let mut at = newparent;
            while at != Ino::ROOT {
                if at == src_ino {
                    return Err(Error::errno(libc::EINVAL));
                }
                at = self.inode(at)?.parent;
            }
        }

        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        let class = if src.kind == Kind::File {
            self.class_of(newparent, newname)?
                .resolve(&self.head_of(&src))
        } else {
            src.class
        };

        if class == Class::Result && src.kind == Kind::File {
            if let Some(existing) = dst.as_ref().filter(|d| Self::is_published_result(d)) {
                // Create-only: the existing result stays; the newcomer goes.
                Stats::bump(&self.stats.counters.conflicts);
                debug!(
                    "rename name={:?} ino={src_ino} outcome=kept-existing",
                    String::from_utf8_lossy(newname)
                );
                txn.batch.delete_dentry(parent, name);
                self.become_alias(&inner, &mut txn, src, existing)?;
                self.touch_dir(&mut txn, self.inode(parent)?, now);
                txn.after.push(After::Invalidate(Invalidate::Entry(
                    newparent,
                    newname.to_vec(),
                )));
                return self.commit_locked(&mut inner, txn, true);
            }
        }

        let publishes = class.is_blob() && src.content == Content::Staged;
        if publishes {
            self.seal_staged(&inner, &mut txn, &mut src, class)?;
        }
        if let Some(d) = dst {
            self.unbind(&inner, &mut txn, newparent, newname, d)?;
        }
        txn.batch.delete_dentry(parent, name);
        txn.batch.put_dentry(newparent, newname, src_ino);
        src.parent = newparent;
        src.name = newname.to_vec();
        src.class = class;
        src.ctime_ns = now;
        txn.batch.put_inode(&src);
        if src.kind == Kind::File {
            self.share(&mut txn, &src)?;
        }
        if parent != newparent {
            self.touch_dir(&mut txn, self.inode(parent)?, now);
        }
        self.touch_dir(&mut txn, newdir, now);
        self.commit_locked(&mut inner, txn, publishes)
    }

    /// Turns an inode that lost a create-only race into an unnamed alias of
    /// the winner's content, so a reader still holding it sees the winner's
    /// bytes; it is deleted once the kernel forgets it.
    fn become_alias(
        &self,
        inner: &Inner,
        txn: &mut Txn,
        mut loser: Inode,
        winner: &Inode,
    ) -> Result<()> {
        let Content::Blob(id) = winner.content else {
            unreachable!("winner is a published result")
        };
        match &loser.content {
            Content::Blob(old) => self.drop_ref(txn, *old, loser.ino, loser.size)?,
            Content::Staged => txn.after.push(After::RemoveStaging(loser.ino)),
            _ => {}
        }
        if self.in_use(inner, loser.ino) {
            // Pages and size the kernel cached while the loser was written
            // are not the winner's: drop them before the request is answered,
            // since the kernel now maps the name to the loser's inode until
            // the name's own invalidation arrives.
            txn.after
                .push(After::InvalidateNow(Invalidate::Data(loser.ino)));
            self.add_ref(txn, id, loser.ino, winner.size);
            loser.content = Content::Blob(id);
            loser.size = winner.size;
            loser.mtime_ns = winner.mtime_ns;
            loser.class = Class::Result;
            loser.nlink = 0;
            txn.batch.put_inode(&loser);
            txn.batch.put_pending(loser.ino, PendingReason::Unbound);
        } else {
            txn.batch.delete_inode(loser.ino);
            txn.batch.delete_pending(loser.ino);
        }
        Ok(())
    }

    pub fn link(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> Result<Attr> {
        Self::refuse_virtual(ino)?;
        let newdir = self.check_new_name(newparent, newname)?;
        let mut inner = self.inner.lock().unwrap();
        let mut src = self.inode(ino)?;
        if src.kind == Kind::Dir {
            return Err(Error::errno(libc::EPERM));
        }
        let class = if src.kind == Kind::File {
            self.class_of(newparent, newname)?
                .resolve(&self.head_of(&src))
        } else {
            Class::Local
        };
        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        if let Some(d) = self.store.dentry(newparent, newname)? {
            let existing = self.inode(d)?;
            if class == Class::Result && Self::is_published_result(&existing) {
                Stats::bump(&self.stats.counters.conflicts);
                debug!(
                    "link name={:?} outcome=kept-existing",
                    String::from_utf8_lossy(newname)
                );
                *inner.nlookup.entry(existing.ino).or_insert(0) += 1;
                return Ok(self.attr_of(&existing));
            }
            return Err(Error::errno(libc::EEXIST));
        }
        let attr;
        if class == Class::Local && (src.content == Content::Staged || src.kind == Kind::Symlink) {
            // A plain hard link between host-local files.
            src.nlink += 1;
            src.ctime_ns = now;
            txn.batch.put_inode(&src);
            txn.batch.put_dentry(newparent, newname, ino);
            attr = self.attr_of(&src);
            self.touch_dir(&mut txn, newdir, now);
            self.commit_locked(&mut inner, txn, false)?;
            *inner.nlookup.entry(ino).or_insert(0) += 1;
            return Ok(attr);
        }
        // Publication under a new name: a new inode bound to the same bytes,
        // so later writes to the source never reach the published name.
        let (id, size) = match src.content.clone() {
            Content::Blob(id) => (id, src.size),
            Content::Staged => {
                // The source keeps its name and stays writable: publish a copy.
                let (id, size, _) = self.stage_to_blob(&mut txn, ino, true)?;
                (id, size)
            }
            _ => return Err(Error::errno(libc::EPERM)),
        };
        let new_ino = self.alloc_ino(&mut inner, &mut txn);
        let mut inode = self.new_inode(
            new_ino,
            Kind::File,
            class,
            src.perm,
            Caller {
                uid: src.uid,
                gid: src.gid,
            },
            &newdir,
            newname,
            now,
        );
        inode.content = Content::Blob(id);
        inode.size = size;
        self.add_ref(&mut txn, id, new_ino, size);
        txn.batch.put_inode(&inode);
        txn.batch.put_dentry(newparent, newname, new_ino);
        self.share(&mut txn, &inode)?;
        self.touch_dir(&mut txn, newdir, now);
        self.commit_locked(&mut inner, txn, true)?;
        *inner.nlookup.entry(new_ino).or_insert(0) += 1;
        Ok(self.attr_of(&inode))
    }

    // ----- publication ---------------------------------------------------------

    /// Makes a staged inode's bytes a durable blob inside `txn` and returns
    /// it. The staging file is linked into place unless it must stay
    /// writable (`must_copy`: a writer still holds it, or it keeps its own
    /// name), in which case a snapshot copy is published instead.
    fn stage_to_blob(
        &self,
        txn: &mut Txn,
        ino: Ino,
        must_copy: bool,
    ) -> Result<(BlobId, u64, Vec<u8>)> {
        let staging = self.blobs.staging_path(ino);
        let file = self.blobs.open_staging(ino, false)?;
        let (file, path) = if must_copy {
            let snap_path = staging.with_extension("snapshot");
            let snap = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&snap_path)
                .map_err(|e| Error::io(e, "create snapshot"))?;
            Blobs::copy_file(&file, &snap, None)?;
            (snap, snap_path)
        } else {
            (file, staging)
        };
        let result = self.install_blob(txn, &file, &path);
        if must_copy {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn install_blob(
        &self,
        txn: &mut Txn,
        file: &File,
        path: &std::path::Path,
    ) -> Result<(BlobId, u64, Vec<u8>)> {
        let hashed = Blobs::hash_file(file)?;
        let id = hashed.id;
        if self.store.blob_known(&id)? || txn.new_blobs.contains(&id) {
            Stats::bump(&self.stats.counters.blobs_deduplicated);
        } else {
            // `install` finds the file already there after a crash between
            // linking and committing: its bytes were hashed and synced
            // before the link, so recording it is enough.
            self.blobs.install(path, file, &id)?;
            txn.batch.put_blob(&id, hashed.size);
            txn.new_blobs.push(id);
            txn.gauges.blobs += 1;
            txn.gauges.bytes_stored += hashed.size;
        }
        Stats::bump(&self.stats.counters.publications);
        Ok((id, hashed.size, hashed.head[..hashed.head_len].to_vec()))
    }

    /// Publishes a staged inode in place: its bytes become a blob and the
    /// inode points at it. The caller binds the name and commits with sync.
    fn seal_staged(
        &self,
        inner: &Inner,
        txn: &mut Txn,
        inode: &mut Inode,
        class: Class,
    ) -> Result<()> {
        debug_assert_eq!(inode.content, Content::Staged);
        let writers = inner.open.get(&inode.ino).map_or(0, |o| o.writers);
        let (id, size, head) = self.stage_to_blob(txn, inode.ino, writers > 0)?;
        self.add_ref(txn, id, inode.ino, size);
        txn.after.push(After::RemoveStaging(inode.ino));
        txn.batch.delete_pending(inode.ino);
        inode.content = Content::Blob(id);
        inode.size = size;
        inode.class = class.resolve(&head);
        inode.mtime_ns = self.tick(txn);
        debug!(
            "publish ino={} blob={id} size={size} class={}",
            inode.ino, inode.class
        );
        Ok(())
    }

    /// Copies a blob-backed inode back into a staging file so it can be
    /// changed (mutable and local classes only), truncated to `len`.
    fn copy_up(&self, txn: &mut Txn, inode: &mut Inode, len: Option<u64>) -> Result<()> {
        let Content::Blob(id) = inode.content else {
            return Ok(());
        };
        let staged = self.blobs.create_staging(inode.ino)?;
        if len != Some(0) {
            let src = self.blobs.open_blob(&id)?;
            Blobs::copy_file(&src, &staged, len)?;
            if let Some(l) = len {
                staged.set_len(l).map_err(|e| Error::io(e, "truncate"))?;
            }
        }
        self.drop_ref(txn, id, inode.ino, inode.size)?;
        inode.content = Content::Staged;
        inode.size = staged.metadata().map(|m| m.size()).unwrap_or(0);
        if inode.class.is_blob() && inode.nlink > 0 {
            txn.batch.put_pending(inode.ino, PendingReason::Unsealed);
        }
        Ok(())
    }

    /// Publishes a staged inode in a shared class that no writer holds open:
    /// called when the last writer closes, and after a truncate.
    pub fn publish_if_idle(&self, ino: Ino) -> Result<()> {
        let mut inner = self.inner.lock().unwrap();
        if inner.open.get(&ino).is_some_and(|o| o.writers > 0) {
            return Ok(());
        }
        let Some(mut inode) = self.store.inode(ino)? else {
            return Ok(());
        };
        if inode.content != Content::Staged || !inode.class.is_blob() {
            return Ok(());
        }
        let awaiting_bind = inner.awaiting_bind.remove(&ino);
        if inode.nlink == 0 && !awaiting_bind {
            return Ok(()); // unlinked while open: nothing to publish
        }
        let mut txn = self.txn(&inner);
        if !awaiting_bind {
            let class = inode.class;
            self.seal_staged(&inner, &mut txn, &mut inode, class)?;
            txn.batch.put_inode(&inode);
            self.share(&mut txn, &inode)?;
            return self.commit_locked(&mut inner, txn, true);
        }
        // Created under its final name: bind it now, create-only for results.
        let (parent, name) = (inode.parent, inode.name.clone());
        let existing = match self.store.dentry(parent, &name)? {
            Some(d) => self.store.inode(d)?,
            None => None,
        };
        let class = inode.class.resolve(&self.head_of(&inode));
        match existing {
            Some(e) if class == Class::Result && Self::is_published_result(&e) => {
                Stats::bump(&self.stats.counters.conflicts);
                debug!(
                    "close-publish name={:?} outcome=kept-existing",
                    String::from_utf8_lossy(&name)
                );
                self.become_alias(&inner, &mut txn, inode, &e)?;
            }
            Some(e) if e.kind == Kind::Dir => {
                debug!(
                    "close-publish name={:?} outcome=dropped-directory-exists",
                    String::from_utf8_lossy(&name)
                );
                self.delete_inode(&mut txn, &inode)?;
            }
            other => {
                self.seal_staged(&inner, &mut txn, &mut inode, class)?;
                if let Some(e) = other {
                    self.unbind(&inner, &mut txn, parent, &name, e)?;
                }
                inode.nlink = 1;
                txn.batch.put_inode(&inode);
                txn.batch.put_dentry(parent, &name, ino);
                self.share(&mut txn, &inode)?;
                self.touch_dir(&mut txn, self.inode(parent)?, inode.mtime_ns);
            }
        }
        // Called from flush, release and setattr, which hold no directory
        // lock: a reader's negative entry goes before close() returns.
        txn.after
            .push(After::InvalidateNow(Invalidate::Entry(parent, name)));
        self.commit_locked(&mut inner, txn, true)
    }

    // ----- files -------------------------------------------------------------

    fn new_handle(
        &self,
        inner: &mut Inner,
        ino: Ino,
        mode: Mode,
        file: Option<File>,
        virt: Option<Vec<u8>>,
    ) -> u64 {
        let fh = inner.next_fh;
        inner.next_fh += 1;
        let h = Handle {
            ino,
            mode,
            file: RwLock::new(file),
            virt,
            published: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            conflict_counted: AtomicBool::new(false),
            immutable_blob: None,
        };
        inner.handles.insert(fh, Arc::new(h));
        let oc = inner.open.entry(ino).or_default();
        oc.handles += 1;
        if mode == Mode::Write {
            oc.writers += 1;
        }
        fh
    }

    /// For a handle reading a published result: the blob and a descriptor
    /// of its file, which the kernel may read directly (FUSE passthrough).
    pub fn passthrough_source(&self, fh: u64) -> Option<(BlobId, File)> {
        let h = self.handle(fh).ok()?;
        let id = h.immutable_blob?;
        let file = h.file.read().unwrap().as_ref()?.try_clone().ok()?;
        Some((id, file))
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.inner
            .lock()
            .unwrap()
            .handles
            .get(&fh)
            .cloned()
            .ok_or_else(|| Error::errno(libc::EBADF))
    }

    fn should_verify(&self) -> bool {
        let n = self.open_counter.fetch_add(1, Ordering::Relaxed);
        (n % 100) < self.config.verify_percent as u64
    }

    /// Opens `ino`. Returns the handle and whether reads must bypass the
    /// page cache (the statistics files).
    pub fn open(&self, ino: Ino, flags: i32) -> Result<(u64, bool)> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if ino.is_virtual() {
            if write {
                return Err(Error::errno(libc::EROFS));
            }
            if ino == Ino::STATS_DIR {
                return Err(Error::errno(libc::EISDIR));
            }
            let bytes = self.render(ino);
            let mut inner = self.inner.lock().unwrap();
            return Ok((
                self.new_handle(&mut inner, ino, Mode::Read, None, Some(bytes)),
                true,
            ));
        }
        if write {
            self.writable()?;
        }
        let mut inner = self.inner.lock().unwrap();
        let mut inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            if write {
                return Err(Error::errno(libc::EISDIR));
            }
            return Ok((
                self.new_handle(&mut inner, ino, Mode::Read, None, None),
                false,
            ));
        }
        if !write {
            let file = match &inode.content {
                Content::Blob(id) => Some(self.open_verified(&mut inner, &inode, *id)?),
                Content::Staged => Some(self.blobs.open_staging(ino, false)?),
                _ => None,
            };
            let fh = self.new_handle(&mut inner, ino, Mode::Read, file, None);
            if let (Class::Result, Content::Blob(id)) = (inode.class, &inode.content) {
                Stats::bump(&self.stats.counters.hits);
                if let Some(h) = inner.handles.get_mut(&fh).and_then(Arc::get_mut) {
                    h.immutable_blob = Some(*id);
                }
            }
            return Ok((fh, false));
        }
        let truncate = flags & libc::O_TRUNC != 0;
        match (&inode.content, inode.class) {
            (Content::Blob(id), Class::Result) => {
                let file = self.blobs.open_blob(id)?;
                let fh = self.new_handle(&mut inner, ino, Mode::Discard, Some(file), None);
                if truncate {
                    Stats::bump(&self.stats.counters.conflicts);
                    inner.handles[&fh]
                        .conflict_counted
                        .store(true, Ordering::Relaxed);
                }
                Ok((fh, false))
            }
            (Content::Blob(_), _) => {
                let mut txn = self.txn(&inner);
                self.copy_up(&mut txn, &mut inode, if truncate { Some(0) } else { None })?;
                inode.mtime_ns = self.tick(&mut txn);
                txn.batch.put_inode(&inode);
                self.commit_locked(&mut inner, txn, false)?;
                let file = self.blobs.open_staging(ino, true)?;
                Ok((
                    self.new_handle(&mut inner, ino, Mode::Write, Some(file), None),
                    false,
                ))
            }
            (Content::Staged, class) => {
                let file = self.blobs.open_staging(ino, true)?;
                let mut txn = self.txn(&inner);
                if truncate {
                    file.set_len(0).map_err(|e| Error::io(e, "truncate"))?;
                    inode.mtime_ns = self.tick(&mut txn);
                    inode.size = 0;
                    txn.batch.put_inode(&inode);
                }
                if class.is_blob() && inode.nlink > 0 {
                    txn.batch.put_pending(ino, PendingReason::Unsealed);
                }
                self.commit_locked(&mut inner, txn, false)?;
                Ok((
                    self.new_handle(&mut inner, ino, Mode::Write, Some(file), None),
                    false,
                ))
            }
            _ => Err(Error::errno(libc::EINVAL)),
        }
    }

    /// Opens a blob, verifying it on the configured sample. A blob that
    /// fails is quarantined and its names dropped: the open fails with EIO.
    fn open_verified(&self, inner: &mut Inner, inode: &Inode, id: BlobId) -> Result<File> {
        let file = match self.blobs.open_blob(&id) {
            Ok(f) => f,
            Err(e) => {
                warn!("blob {id} of ino={} is missing: {e}", inode.ino);
                self.drop_corrupt(inner, id)?;
                return Err(Error::with_context(
                    libc::EIO,
                    format!("blob {id} is missing"),
                ));
            }
        };
        if self.should_verify() {
            Stats::bump(&self.stats.counters.blobs_verified);
            if !Blobs::verify(&file, &id)? {
                warn!(
                    "corrupt blob={id} ino={} name={:?}: bytes do not match the hash; quarantined",
                    inode.ino,
                    String::from_utf8_lossy(&inode.name)
                );
                Stats::bump(&self.stats.counters.corrupt_blobs);
                self.drop_corrupt(inner, id)?;
                return Err(Error::errno(libc::EIO));
            }
        }
        Ok(file)
    }

    /// Removes every name pointing at a damaged blob, so the next lookup is
    /// a miss and the cache refills it with correct bytes.
    fn drop_corrupt(&self, inner: &mut Inner, id: BlobId) -> Result<()> {
        let mut txn = self.txn(inner);
        for ino in self.store.blob_refs(&id, DIR_ENTRIES_MAX)? {
            let Some(inode) = self.store.inode(ino)? else {
                continue;
            };
            let (parent, name) = (inode.parent, inode.name.clone());
            if inode.nlink > 0 && self.store.dentry(parent, &name)? == Some(ino) {
                self.unbind(inner, &mut txn, parent, &name, inode)?;
                txn.after
                    .push(After::Invalidate(Invalidate::Entry(parent, name)));
            }
        }
        self.commit_locked(inner, txn, false)?;
        self.blobs.quarantine(&id);
        Ok(())
    }

    pub fn create(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64)> {
        let dir = self.check_new_name(parent, name)?;
        let mut inner = self.inner.lock().unwrap();
        if let Some(existing) = self.store.dentry(parent, name)? {
            if flags & libc::O_EXCL != 0 {
                return Err(Error::errno(libc::EEXIST));
            }
            drop(inner);
            let (fh, _) = self.open(existing, flags)?;
            let attr = self.getattr(existing)?;
            self.remember(existing);
            return Ok((attr, fh));
        }
        self.check_space()?;
        let class = self.class_of(parent, name)?;
        let mut txn = self.txn(&inner);
        let now = self.tick(&mut txn);
        let ino = self.alloc_ino(&mut inner, &mut txn);
        let mut inode = self.new_inode(
            ino,
            Kind::File,
            class,
            (mode & 0o7777) as u16,
            caller,
            &dir,
            name,
            now,
        );
        inode.content = Content::Staged;
        let file = self.blobs.create_staging(ino)?;
        match class {
            Class::Local => txn.batch.put_dentry(parent, name, ino),
            Class::Mutable => {
                txn.batch.put_dentry(parent, name, ino);
                txn.batch.put_pending(ino, PendingReason::Unsealed);
            }
            Class::Result | Class::CcacheEntry => {
                // Not visible under its name until it is published at close.
                inode.nlink = 0;
                txn.batch.put_pending(ino, PendingReason::Unbound);
                inner.awaiting_bind.insert(ino);
            }
        }
        txn.batch.put_inode(&inode);
        if inode.nlink > 0 {
            self.touch_dir(&mut txn, dir, now);
        }
        if let Err(e) = self.commit_locked(&mut inner, txn, false) {
            inner.awaiting_bind.remove(&ino);
            self.blobs.remove_staging(ino);
            return Err(e);
        }
        *inner.nlookup.entry(ino).or_insert(0) += 1;
        let fh = self.new_handle(&mut inner, ino, Mode::Write, Some(file), None);
        Ok((self.attr_of(&inode), fh))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.handle(fh)?;
        if let Some(v) = &h.virt {
            let start = (offset as usize).min(v.len());
            let end = (start + size as usize).min(v.len());
            return Ok(v[start..end].to_vec());
        }
        let guard = h.file.read().unwrap();
        let Some(file) = guard.as_ref() else {
            return Err(Error::errno(libc::EISDIR));
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = file
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(|e| Error::io(e, "read"))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.handle(fh)?;
        match h.mode {
            Mode::Read => Err(Error::errno(libc::EBADF)),
            Mode::Discard => {
                if !h.conflict_counted.swap(true, Ordering::Relaxed) {
                    Stats::bump(&self.stats.counters.conflicts);
                    debug!("write ino={} outcome=discarded-onto-existing-result", h.ino);
                }
                Ok(data.len() as u32)
            }
            Mode::Write => {
                if h.published.load(Ordering::Acquire) && self.restage(&h)? {
                    return Ok(data.len() as u32);
                }
                self.check_space()?;
                let guard = h.file.read().unwrap();
                let file = guard.as_ref().expect("write handles hold a file");
                file.write_all_at(data, offset).map_err(|e| {
                    self.count_error(Error::io(e, format_args!("write ino={}", h.ino)))
                })?;
                h.dirty.store(true, Ordering::Relaxed);
                Ok(data.len() as u32)
            }
        }
    }

    /// A write through a handle whose bytes were already published: a
    /// result keeps its published bytes (the write is discarded, counted as
    /// a conflict: returns true); anything else is copied back to a staging
    /// file that this handle writes from now on, published again at close.
    fn restage(&self, h: &Handle) -> Result<bool> {
        let mut inner = self.inner.lock().unwrap();
        if !h.published.load(Ordering::Acquire) {
            return Ok(false); // another write got here first
        }
        let mut inode = self.inode(h.ino)?;
        match (&inode.content, inode.class) {
            (Content::Blob(_), Class::Result) => {
                if !h.conflict_counted.swap(true, Ordering::Relaxed) {
                    Stats::bump(&self.stats.counters.conflicts);
                    debug!("write ino={} outcome=discarded-after-publication", h.ino);
                }
                return Ok(true);
            }
            (Content::Blob(_), _) => {
                let mut txn = self.txn(&inner);
                self.copy_up(&mut txn, &mut inode, None)?;
                inode.mtime_ns = self.tick(&mut txn);
                txn.batch.put_inode(&inode);
                self.commit_locked(&mut inner, txn, false)?;
            }
            (Content::Staged, _) => {}
            _ => return Err(Error::errno(libc::EBADF)),
        }
        *h.file.write().unwrap() = Some(self.blobs.open_staging(h.ino, true)?);
        h.published.store(false, Ordering::Release);
        inner.open.entry(h.ino).or_default().writers += 1;
        Ok(false)
    }

    /// On close: record size and mtime; if this was the last writer of a
    /// shared-class file, publish it now so close() reports any failure.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let h = self.handle(fh)?;
        if h.mode != Mode::Write || h.published.load(Ordering::Acquire) {
            return Ok(());
        }
        {
            let mut inner = self.inner.lock().unwrap();
            let only_writer = inner.open.get(&h.ino).is_some_and(|o| o.writers <= 1);
            if h.dirty.swap(false, Ordering::Relaxed) {
                if let Some(mut inode) = self.store.inode(h.ino)? {
                    if inode.content == Content::Staged {
                        let mut txn = self.txn(&inner);
                        inode.mtime_ns = self.tick(&mut txn);
                        inode.size = h
                            .file
                            .read()
                            .unwrap()
                            .as_ref()
                            .and_then(|f| f.metadata().ok())
                            .map_or(inode.size, |m| m.size());
                        txn.batch.put_inode(&inode);
                        txn.after.push(After::Invalidate(Invalidate::Attr(h.ino)));
                        self.commit_locked(&mut inner, txn, false)?;
                    }
                }
            }
            if !only_writer {
                return Ok(());
            }
            let Some(inode) = self.store.inode(h.ino)? else {
                return Ok(());
            };
            if inode.content != Content::Staged || !inode.class.is_blob() {
                return Ok(());
            }
            h.published.store(true, Ordering::Release);
            // This handle writes no more: publication sees a stable file.
            if let Some(o) = inner.open.get_mut(&h.ino) {
                o.writers = o.writers.saturating_sub(1);
            }
        }
        self.publish_if_idle(h.ino)
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let (h, ino) = {
            let mut inner = self.inner.lock().unwrap();
            let Some(h) = inner.handles.remove(&fh) else {
                return Err(Error::errno(libc::EBADF));
            };
            let ino = h.ino;
            if let Some(o) = inner.open.get_mut(&ino) {
                o.handles = o.handles.saturating_sub(1);
                if h.mode == Mode::Write && !h.published.load(Ordering::Acquire) {
                    o.writers = o.writers.saturating_sub(1);
                }
                if o.handles == 0 {
                    inner.open.remove(&ino);
                }
            }
            (h, ino)
        };
        if ino.is_virtual() {
            return Ok(());
        }
        let result = if h.mode == Mode::Write && !h.published.load(Ordering::Acquire) {
            self.publish_if_idle(ino)
        } else {
            Ok(())
        };
        drop(h);
        let mut inner = self.inner.lock().unwrap();
        self.maybe_forget(&mut inner, ino)?;
        result
    }

    pub fn fsync(&self, fh: u64) -> Result<()> {
        let h = self.handle(fh)?;
        if let (Mode::Write, Some(f)) = (h.mode, h.file.read().unwrap().as_ref()) {
            f.sync_all().map_err(|e| Error::io(e, "fsync"))?;
        }
        Ok(())
    }

    // ----- directories ---------------------------------------------------------

    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        let mut entries = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: Ino::ROOT,
                kind: Kind::Dir,
                name: b"..".to_vec(),
            },
        ];
        if ino == Ino::STATS_DIR {
            for (name, i) in STATS_FILES {
                entries.push(DirEntry {
                    ino: i,
                    kind: Kind::File,
                    name: name.to_vec(),
                });
            }
        } else {
            let dir = self.inode(ino)?;
            if dir.kind != Kind::Dir {
                return Err(Error::errno(libc::ENOTDIR));
            }
            entries[1].ino = dir.parent;
            if ino == Ino::ROOT {
                entries.push(DirEntry {
                    ino: Ino::STATS_DIR,
                    kind: Kind::Dir,
                    name: STATS_DIR_NAME.to_vec(),
                });
            }
            for (name, child) in self.store.list_dir(ino, DIR_ENTRIES_MAX)? {
                if let Some(c) = self.store.inode(child)? {
                    entries.push(DirEntry {
                        ino: child,
                        kind: c.kind,
                        name,
                    });
                }
            }
        }
        let mut inner = self.inner.lock().unwrap();
        let fh = inner.next_fh;
        inner.next_fh += 1;
        inner.dirs.insert(fh, Arc::new(entries));
        Ok(fh)
    }

    /// Entries from `offset` on; the offset of entry i is i + 1.
    pub fn readdir(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>> {
        self.inner
            .lock()
            .unwrap()
            .dirs
            .get(&fh)
            .cloned()
            .ok_or_else(|| Error::errno(libc::EBADF))
    }

    pub fn releasedir(&self, fh: u64) {
        self.inner.lock().unwrap().dirs.remove(&fh);
    }

    // ----- scrub ------------------------------------------------------------------

    /// Checks one blob, picked at random, against its hash; a damaged one
    /// is quarantined and its names dropped, as on open.
    pub fn scrub_one(&self) -> Result<()> {
        let seed = crate::clock::wall_ns().to_le_bytes();
        let from = *blake3::hash(&seed).as_bytes();
        let Some(id) = self.store.blob_at_or_after(&from)? else {
            return Ok(());
        };
        let Ok(file) = self.blobs.open_blob(&id) else {
            warn!("scrub: blob {id} is missing; dropping its names");
            let mut inner = self.inner.lock().unwrap();
            return self.drop_corrupt(&mut inner, id);
        };
        Stats::bump(&self.stats.counters.blobs_scrubbed);
        if !Blobs::verify(&file, &id)? {
            warn!(
                "scrub: corrupt blob={id}: bytes do not match the hash; quarantined, names dropped"
            );
            Stats::bump(&self.stats.counters.corrupt_blobs);
            let mut inner = self.inner.lock().unwrap();
            self.drop_corrupt(&mut inner, id)?;
        }
        Ok(())
    }

    // ----- size limit -----------------------------------------------------------

    /// Bytes of blobs in the store now.
    pub fn bytes_stored(&self) -> u64 {
        self.inner.lock().unwrap().gauges.bytes_stored
    }

    /// Evicts least recently used names (oldest mtime first: a hit's touch
    /// counts as use) of published blobs until the store holds at most
    /// `target_bytes`. Files being written are not candidates (they are not
    /// blobs yet) and neither are open ones; an evicted name's blob goes
    /// with its last reference, and the kernel is told the name is gone.
    /// Returns the number of names evicted.
    pub fn evict(&self, target_bytes: u64) -> Result<u64> {
        let mut evicted = 0;
        while self.bytes_stored() > target_bytes {
            // The oldest EVICT_BATCH_MAX candidates, by a scan without the lock.
            let mut heap = std::collections::BinaryHeap::new();
            self.store.for_each_inode(|r| {
                if let Ok(i) = r {
                    if i.kind == Kind::File && i.nlink > 0 && matches!(i.content, Content::Blob(_))
                    {
                        heap.push((i.mtime_ns, i.ino.0));
                        if heap.len() > EVICT_BATCH_MAX {
                            heap.pop();
                        }
                    }
                }
            })?;
            if heap.is_empty() {
                break;
            }
            let before = evicted;
            for (mtime_ns, ino) in heap.into_sorted_vec() {
                if self.bytes_stored() <= target_bytes {
                    break;
                }
                if self.evict_one(Ino(ino), mtime_ns)? {
                    evicted += 1;
                }
            }
            if evicted == before {
                break; // everything left is in use
            }
        }
        Ok(evicted)
    }

    fn evict_one(&self, ino: Ino, seen_mtime_ns: u64) -> Result<bool> {
        let mut inner = self.inner.lock().unwrap();
        let Some(inode) = self.store.inode(ino)? else {
            return Ok(false);
        };
        // Used since the scan, open, or no longer a published name: keep.
        if inode.mtime_ns != seen_mtime_ns
            || inode.nlink == 0
            || inner.open.get(&ino).is_some_and(|o| o.handles > 0)
            || !matches!(inode.content, Content::Blob(_))
        {
            return Ok(false);
        }
        let (parent, name, size) = (inode.parent, inode.name.clone(), inode.size);
        if self.store.dentry(parent, &name)? != Some(ino) {
            return Ok(false);
        }
        let mut txn = self.txn(&inner);
        self.unbind(&inner, &mut txn, parent, &name, inode)?;
        txn.after
            .push(After::Invalidate(Invalidate::Entry(parent, name.clone())));
        self.commit_locked(&mut inner, txn, false)?;
        Stats::bump(&self.stats.counters.evictions);
        self.stats
            .counters
            .bytes_evicted
            .fetch_add(size, Ordering::Relaxed);
        debug!(
            "evict name={:?} ino={ino} size={size}",
            String::from_utf8_lossy(&name)
        );
        Ok(true)
    }

    /// Fills the store with `entries` distinct results in a ccache ≤ 4.12
    /// layout below `cc/` (for the scale benchmark), through the same calls
    /// a mount makes. Returns their paths' leaf names in order.
    pub fn populate(&self, entries: u64) -> Result<()> {
        let me = Caller { uid: 0, gid: 0 };
        let cc = match self.store.dentry(Ino::ROOT, b"cc")? {
            Some(i) => i,
            None => self.mkdir(Ino::ROOT, b"cc", 0o755, me)?.ino,
        };
        let hex = b"0123456789abcdef";
        let mut dirs = Vec::new();
        for a in hex {
            let da = match self.store.dentry(cc, &[*a])? {
                Some(i) => i,
                None => self.mkdir(cc, &[*a], 0o755, me)?.ino,
            };
            for b in hex {
                let db = match self.store.dentry(da, &[*b])? {
                    Some(i) => i,
                    None => self.mkdir(da, &[*b], 0o755, me)?.ino,
                };
                dirs.push(db);
            }
        }
        for i in 0..entries {
            let dir = dirs[(i % 256) as usize];
            let (_, fh) = self.create(dir, b"p.tmp", 0o644, libc::O_EXCL, me)?;
            self.write(fh, 0, format!("casfs scale entry {i}\n").as_bytes())?;
            self.flush(fh)?;
            self.release(fh)?;
            self.rename(dir, b"p.tmp", dir, format!("{i:030}R").as_bytes(), 0)?;
            let ino = self
                .store
                .dentry(dir, format!("{i:030}R").as_bytes())?
                .expect("just published");
            self.forget(ino, 1);
        }
        Ok(())
    }

    /// Flushes the metadata log at unmount.
    pub fn shutdown(&self) {
        if let Err(e) = self.store.flush() {
            warn!("flush at shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
