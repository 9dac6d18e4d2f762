//! The filesystem core: every operation a cache directory needs, on the
//! metadata store and the blob files, with no knowledge of FUSE. The FUSE
//! adapter (`crate::fuse`) translates kernel requests into these calls.
//!
//! Modules, one concern each:
//! - `namespace`: lookups, attributes, directories, create, unlink, rename, link;
//! - `publish`: turning staged bytes into a blob and binding names (create-only
//!   for results), copy-up of blobs that must change;
//! - `handles`: open files (the handle table) and their I/O;
//! - `usage`: what the kernel and open handles hold of each inode;
//! - `perm`: the permission checks `default_permissions` would make;
//! - `txn`: one metadata change (batch, gauge deltas, work after commit);
//! - `locks`: the striped locks and sharded tables below;
//! - `virtual_files`: the read-only `.casfs/` statistics files;
//! - `maintenance`: recovery at start, scrub, eviction, corrupt blobs;
//! - `verified`: which blob files are trusted without hashing (the verified
//!   set and its rule), and the check of a blob file a publication dedups onto;
//! - `tier_link`: the one seam to the shared tier.
//!
//! How bytes move:
//! - A host-local file (class `local`) is a plain file in the host-local
//!   tree, `local/<dir ino>/<name>`, with no record in RocksDB (`local`:
//!   each operation one syscall there); it is imported into RocksDB as a
//!   staged file when it gets a shared name (ccache's temporary renamed
//!   onto a result).
//! - Every other regular file is either *staged* (its bytes in
//!   `staging/<ino>`: being written, or a host-local file of a store from
//!   before the tree) or a *blob* (published, immutable, named by its hash).
//! - A staged file in a shared class (result, mutable, ccache-entry) is
//!   published when it is renamed or linked into such a name, or when the
//!   last writer closes a file created under its final name. Publication is
//!   two steps: `prepare` (hash, fdatasync, link into `blobs/`, fsync the
//!   shard directory) with no lock held, then a short critical section that
//!   re-checks and commits the metadata; the log is synced after the locks
//!   are released, before the caller is answered.
//!
//! Invariants (each kept by the code that names it):
//! - Atomic visibility: a file created under a create-only name is not bound
//!   to that name until it is published (`publish_if_idle`); a shared name
//!   being rewritten in place is marked `Unsealed` and dropped after a crash.
//! - Create-only: binding onto an existing result keeps the existing one
//!   (`become_alias`), counts a conflict, and invalidates the kernel's view.
//! - Open files are stable: a handle holds its own descriptor on the blob or
//!   staging file; an inode lives while it has a name, a handle or a kernel
//!   reference (`maybe_forget`).
//! - A blob's bytes never change under its id, so a blob verified once
//!   is not hashed again on open, but only while its file is the very file
//!   that was verified, unchanged (`verified`: device, inode, size, mtime,
//!   ctime); a changed file is hashed again before it is used, and before a
//!   publication dedups onto it. The scrub re-checks blobs for what that
//!   rule cannot see (bytes changed below the filesystem).
//! - Every mtime and ctime the daemon assigns comes from `Clock`. An mtime a
//!   client sets explicitly is kept as given (`Inode::mtime_set`): a FLUSH
//!   stamps only writes made after it (`Usage::take_written`), and a
//!   publication keeps it (`seal_into`).
//! - The store gauges change only by deltas (a merge operator), never by
//!   read-modify-write, so batches of unrelated names never conflict.
//!
//! # Locks and their order
//!
//! Take locks only in this order; never wait on the kernel, the network,
//! an fsync or a hash while holding any of them.
//!
//! 1. `dir_rename` (a mutex): held by renames of directories only, so that
//!    the "not into its own subtree" check sees a tree no other rename is
//!    changing (the kernel does the same with its own rename mutex).
//!
//!    1a. `evict_pass` (a mutex): held by one eviction pass
//!    (`keep_under_limit`). Publications run it after their commit and log
//!    sync, with no stripe held (a rename may still hold `dir_rename`); the
//!    pass takes the stripes below, one name at a time.
//! 2. Inode stripes (`InodeLocks`, reader-writer): a directory's stripe
//!    guards its entries, a file's stripe guards its record. Mutations take
//!    every inode they read-modify-write, in one `lock` call (which sorts the
//!    stripes). Lookups take their directory's stripe shared, so a name and
//!    the kernel reference counted for it are consistent with unbinds. An
//!    operation that must find out which inodes to lock (the child of a
//!    name) reads without the lock, locks, re-reads, and retries if the
//!    answer changed.
//! 3. Blob stripes (`BlobLocks`): the references, record and file presence
//!    of a blob. Taken once per transaction (`Core::lock_blobs`), for every
//!    blob the transaction adds or drops a reference to, and held until its
//!    commit and the file removals after it are done.
//! 4. Leaf locks, one at a time, each held for one map operation: the
//!    `usage` shards (kernel references, handles, writers, sealing; writers
//!    and sealers wait on them only with no other lock held), the handle
//!    table, directory listings, the verified-blob set, the
//!    supplementary-group cache, the spare staging files, the host-local
//!    inode maps (`local`), the clock and the
//!    inode-number allocator. The last two write a lease record (a RocksDB
//!    put, not synced) under their mutex once per lease.
//! 5. The store's hold on its database (`store/meta.rs`): shared for one
//!    RocksDB call, with nothing else taken meanwhile (asserted);
//!    exclusive only to reopen a database that a full disk stopped.
//!
//! Known waits under a stripe (each on the file's own stripe, so another
//! name waits only if it collides, 1 in `INODE_STRIPES`; none on the
//! network, none unbounded):
//! - a commit is a RocksDB write, and RocksDB groups concurrent writers, so
//!   a commit can wait for the log sync of a publication that joined the
//!   same group (`sync_log`);
//! - copy-up of a mutable file copies its blob under the file's own stripe;
//! - a truncate (`setattr` with a size, `open` with `O_TRUNC`) runs
//!   `ftruncate` on the file's staging file, and opens of staging or blob
//!   files and the `fstat` that reads a staged file's size at close
//!   (`flush`) run under the file's stripe: local-disk metadata calls;
//! - a suspected corrupt blob is re-hashed under its blob stripe before it
//!   is dropped; a blob file a publication dedups onto is hashed under its
//!   blob stripe if it changed between the check without locks and the
//!   commit (`settle_blob_file`);
//! - once per disk-full episode, the first write after space is back
//!   reopens the metadata database (waiting for the RocksDB calls in
//!   flight, and replaying the log) under whatever its caller holds.
//!
//! Never under a stripe: a wait for a seal to end (`Usage::open` of a
//! writer, `writer_again`, `begin_seal`), whose length is a hash and an
//! fsync that no one bounds. `locks::assert_no_stripe_held` asserts it at
//! each such wait, and every taking of a lock asserts its level against
//! what the thread already holds (`locks::hold`, a thread-local count per
//! level), in the release build the tests run.
//!
//! Waits for contended inode and blob stripes are timed into
//! `Stats::lock_wait` (`.casfs/metrics`: `casfs_lock_wait_seconds`).

mod handles;
mod local;
mod locks;
mod maintenance;
mod namespace;
mod perm;
mod publish;
mod tier_link;
mod txn;
mod usage;
mod verified;
mod virtual_files;

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use log::{info, warn};

use crate::classes::Rules;
use crate::error::{enoent, Error, Result};
use crate::shared::tier::Tier;
use crate::stats::Stats;
use crate::store::blobs::{Blobs, FileIdentity};
use crate::store::clock::Clock;
use crate::store::ids::{BlobId, Ino, InoAllocator};
use crate::store::meta::{Content, Inode, Kind, Store};

use handles::HandleTable;
use locks::{BlobLocks, InodeGuard, InodeLocks, Sharded};
use txn::Gauges;
use usage::Usage;

pub use perm::{Who, MAY_EXEC, MAY_READ, MAY_WRITE};
pub use virtual_files::STATS_DIR_NAME;

/// Longest name component, as on Linux filesystems.
pub const NAME_BYTES_MAX: usize = 255;
/// Longest symlink target.
pub const SYMLINK_BYTES_MAX: usize = 4095;
/// Most entries one directory listing holds in memory.
pub const DIR_ENTRIES_MAX: usize = 1 << 20;
/// Most inodes whose pending touches one commit writes (`write_touches`).
pub const TOUCH_BATCH_MAX: usize = 64;
/// Most eviction candidates one pass of `evict` collects (the oldest ones).
pub const EVICT_BATCH_MAX: usize = 4096;
/// Most blob ids remembered as verified (an id and a file identity, 80 bytes
/// each); past it a shard of the set is emptied and its blobs are verified
/// again on their next open.
pub const VERIFIED_BLOBS_MAX: usize = 1 << 18;
/// How many times an operation re-reads and re-locks when what it locked
/// changed under it before it got the lock, before giving up with EAGAIN.
const RETRIES_MAX: usize = 64;

/// Settings the core needs, validated by the command line.
pub struct Config {
    pub rules: Rules,
    /// Percentage (0..=100) of first opens of a blob verified against the
    /// hash (a blob that passed once is not hashed again in this mount).
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
    pub atime_ns: u64,
    pub ctime_ns: u64,
    /// False while the name is not yet bound (the kernel must not cache it).
    pub cacheable: bool,
    /// A device node's device number (0 for everything else).
    pub rdev: u32,
}

/// What changed in a `setattr`.
#[derive(Default, Debug)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// A time a client sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// `UTIME_NOW`: the daemon's clock (a touch).
    Now,
    /// An explicit time (ns since the epoch), stored as given: tools that
    /// set times (`touch -t`, `tar x`, `cp -a`) mean them.
    At(u64),
}

impl SetAttr {
    /// Both times to now, as `utimensat(path, NULL)` does.
    pub fn touch() -> SetAttr {
        SetAttr {
            atime: Some(SetTime::Now),
            mtime: Some(SetTime::Now),
            ..SetAttr::default()
        }
    }

    /// True if a time is set to now (needs ownership or write permission).
    pub fn touches(&self) -> bool {
        self.atime == Some(SetTime::Now) || self.mtime == Some(SetTime::Now)
    }

    /// True if a time is set explicitly (needs ownership).
    pub fn sets_explicit_time(&self) -> bool {
        matches!(self.atime, Some(SetTime::At(_))) || matches!(self.mtime, Some(SetTime::At(_)))
    }
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

pub struct Core {
    store: Store,
    blobs: Blobs,
    clock: Clock,
    inos: InoAllocator,
    config: Config,
    pub stats: Stats,
    gauges: Gauges,
    /// Lock order: see the module doc.
    dir_rename: Mutex<()>,
    inode_locks: InodeLocks,
    blob_locks: BlobLocks,
    usage: Usage,
    /// Host-local files: their tree and inode numbers (local.rs).
    local: local::LocalTree,
    handles: HandleTable,
    /// Open directory listings, and whether each was read from the start.
    dirs: Sharded<u64, (Arc<Vec<DirEntry>>, bool)>,
    next_fh: AtomicU64,
    /// Blobs that passed verification in this mount (bounded), each with the
    /// identity of the file that was hashed. Rule: a blob is trusted without
    /// hashing only while the file about to be used has exactly this
    /// identity (see `verified.rs` for what that does and does not catch).
    verified: Sharded<BlobId, FileIdentity>,
    /// Supplementary groups by process, with the wall ms they expire (perm.rs).
    groups: Sharded<u64, (Vec<u32>, u64)>,
    kernel: OnceLock<Box<dyn KernelCache>>,
    /// The shared tier, when `--shared` is given.
    tier: OnceLock<Arc<Tier>>,
    open_counter: AtomicU64,
    space: maintenance::SpaceCheck,
    /// `--max-size`, when given (`set_size_limit`).
    size_limit: OnceLock<maintenance::SizeLimit>,
    /// Held by an eviction pass (`keep_under_limit`); lock order level 1a.
    evict_pass: Mutex<()>,
    /// Evicted inodes the kernel still holds (maintenance.rs).
    evicted: maintenance::Evicted,
    /// True while the clock's lease cannot be written (`now`).
    lease_failing: AtomicBool,
    /// What the seam to the shared tier remembers (tier_link.rs).
    tier_local: tier_link::TierLocal,
    /// Bounds how many operating errors reach the log (`count_error`).
    error_log: crate::error::ErrorLog,
    /// The owner of `.casfs` and its files (virtual_files.rs).
    virtual_owner: virtual_files::VirtualOwner,
}

thread_local! {
    /// Invalidations the kernel must get before the current request is
    /// answered; see `Core::send_urgent_invalidations`.
    static URGENT: std::cell::RefCell<Vec<Invalidate>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_BYTES_MAX {
        return Err(Error::errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Error::errno(libc::EINVAL));
    }
    Ok(())
}

impl Core {
    /// Opens the core on a store: recovers from a crash (drops what was
    /// never published), and makes the root directory if the store is new.
    pub fn start(store: Store, config: Config) -> Result<Core> {
        let clock = Clock::start(store.clock_lease()?);
        let inos = InoAllocator::start(store.ino_lease()?);
        let gauges = Gauges::new(store.gauges()?);
        let blobs = Blobs::new(&store.root, config.durable);
        let local = local::LocalTree::open(&store.root)?;
        let core = Core {
            store,
            blobs,
            clock,
            inos,
            config,
            stats: Stats::default(),
            gauges,
            dir_rename: Mutex::new(()),
            inode_locks: InodeLocks::new(),
            blob_locks: BlobLocks::new(),
            usage: Usage::new(),
            local,
            handles: HandleTable::new(),
            dirs: Sharded::new(),
            next_fh: AtomicU64::new(1),
            verified: Sharded::new(),
            groups: Sharded::new(),
            kernel: OnceLock::new(),
            tier: OnceLock::new(),
            open_counter: AtomicU64::new(0),
            space: maintenance::SpaceCheck::default(),
            size_limit: OnceLock::new(),
            evict_pass: Mutex::new(()),
            evicted: Default::default(),
            lease_failing: AtomicBool::new(false),
            tier_local: Default::default(),
            error_log: Default::default(),
            virtual_owner: Default::default(),
        };
        core.ensure_root()?;
        if !core.config.read_only {
            core.recover()?;
            core.recover_local()?;
            core.apply_root_settings()?;
        }
        Ok(core)
    }

    /// Connects the core to the kernel's caches (once, at mount).
    pub fn set_kernel_cache(&self, kernel: Box<dyn KernelCache>) {
        if self.kernel.set(kernel).is_err() {
            warn!("kernel cache connected twice; keeping the first");
        }
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

    /// Writes pending touches and flushes the metadata log at unmount.
    pub fn shutdown(&self) {
        if let Err(e) = self.write_touches() {
            warn!(
                "unmount: {} touches not written ({e}); those entries look older to eviction",
                self.store.touches.len()
            );
        }
        if let Err(e) = self.store.flush() {
            warn!("flush at shutdown: {e}");
        }
        if let Some(summary) = self.error_log.flush(std::time::Instant::now(), true) {
            warn!("{summary}");
        }
    }

    /// Logs how many operating errors were not logged, once their window
    /// has ended (the daemon calls this periodically).
    pub fn flush_error_log(&self) {
        if let Some(summary) = self.error_log.flush(std::time::Instant::now(), false) {
            warn!("{summary}");
        }
    }

    /// Refuses changes on a read-only mount.
    fn writable(&self) -> Result<()> {
        if self.config.read_only {
            return Err(Error::errno(libc::EROFS));
        }
        Ok(())
    }

    /// The next timestamp of the daemon's clock (persisting its lease when
    /// due). A lease that cannot be written (a full disk) is retried on
    /// every tick, quietly: logged once when it starts failing and once
    /// when it is written again.
    fn now(&self) -> u64 {
        self.clock
            .tick(|lease| match self.store.put_clock_lease(lease) {
                Ok(()) => {
                    if self.lease_failing.swap(false, Ordering::Relaxed) {
                        info!("clock lease written again");
                    }
                    true
                }
                Err(e) => {
                    if !self.lease_failing.swap(true, Ordering::Relaxed) {
                        warn!("clock lease not written: {e}; retried on every tick until it is");
                    }
                    false
                }
            })
    }

    fn alloc_ino(&self) -> Result<Ino> {
        self.inos.next(|lease| self.store.put_ino_lease(lease))
    }

    fn next_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Exclusive hold on the stripes of `inos` (lock order level 2).
    fn lock(&self, inos: &[Ino]) -> InodeGuard<'_> {
        self.inode_locks.lock(inos, &self.stats.lock_wait)
    }

    /// Makes committed batches durable (after the locks are released), when
    /// the change is a publication the caller is about to acknowledge; then
    /// keeps the store under its size limit before the caller is answered
    /// (`keep_under_limit`), so publications cannot outrun eviction.
    fn sync_log(&self) -> Result<()> {
        if self.config.durable {
            self.store.sync_log().map_err(|e| self.count_error(e))?;
        }
        self.keep_under_limit();
        Ok(())
    }

    /// Counts an operating error and logs it, rate-limited (`ErrorLog`):
    /// the counter counts every one.
    fn count_error(&self, e: Error) -> Error {
        if e.is_operating_error() {
            Stats::bump(&self.stats.counters.errors);
            for line in self.error_log.record(std::time::Instant::now(), &e) {
                warn!("{line}");
            }
        }
        e
    }

    fn inode(&self, ino: Ino) -> Result<Inode> {
        match self.store.inode(ino)? {
            Some(i) => Ok(i),
            None => enoent(),
        }
    }

    fn attr_of(&self, inode: &Inode) -> Attr {
        let size = match (&inode.content, inode.kind) {
            (Content::Staged, _) => std::fs::metadata(self.blobs.staging_path(inode.ino))
                .map(|m| std::os::unix::fs::MetadataExt::size(&m))
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
            // 0 for a file unlinked while open (as `fstat` shows on Linux);
            // a file created under a result name counts as named until its
            // close binds it.
            nlink: if inode.nlink == 0 && !self.usage.awaiting_bind(inode.ino) {
                0
            } else if inode.ino == Ino::ROOT {
                inode.nlink + 1 // the virtual `.casfs` directory
            } else {
                inode.nlink.max(1)
            },
            size,
            mtime_ns: inode.mtime_ns,
            atime_ns: inode.atime_ns.unwrap_or(inode.mtime_ns),
            ctime_ns: inode.ctime_ns,
            cacheable: inode.nlink > 0,
            rdev: match inode.content {
                Content::Device(rdev) => rdev,
                _ => 0,
            },
        }
    }

    /// Opens a blob file for reading.
    fn open_blob(&self, id: &BlobId) -> Result<File> {
        self.blobs.open_blob(id)
    }
}

#[cfg(test)]
mod tests;
