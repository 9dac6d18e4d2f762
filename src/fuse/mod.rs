//! The FUSE adapter: the only file that knows fuser's request and reply
//! types. Each handler starts timing the request (`Timed`), calls the core
//! and replies; the timing and the outcome go to the per-operation
//! statistics when the handler returns.
//!
//! Invariants:
//! - The kernel may cache names (also absent ones), attributes and pages
//!   for long (`TTL`, `FOPEN_KEEP_CACHE`): whatever the daemon changes on its
//!   own, it invalidates (`Invalidate`).
//! - Reads of published results use FUSE passthrough when the kernel has it
//!   (the kernel reads the blob file itself): a result's blob never changes,
//!   and the open still goes through the core, which verifies the blob and
//!   counts the hit. One backing id per inode, held until the last release.
//! - A registered backing file is used for an open only if it is the very
//!   file (device, inode) the core just verified or trusted for that open:
//!   a blob file replaced since (a damaged one healed by a publication) is
//!   never read through a backing id registered on the old file.
//! - An invalidation is sent either before the reply with no core lock held
//!   (`send_urgent_invalidations`, for requests that hold no directory lock
//!   or for inode data), or after it by the `invalidator` thread (names
//!   changed during rename, create and the like, whose directory the kernel
//!   holds locked until we reply).

pub mod uring;

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, Notifier,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use log::debug;

use crate::error::Error;
use crate::fs::{
    Attr, Caller, Core, Invalidate, KernelCache, SetAttr, SetTime, Who, MAY_EXEC, MAY_READ,
    MAY_WRITE, NAME_BYTES_MAX,
};
use crate::stats::Op;
use crate::store::blobs::FileIdentity;
use crate::store::clock::to_system_time;
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::Kind;

/// How long the kernel may trust names (present or absent) and attributes.
/// On one host every change either goes through this kernel, which keeps its
/// own caches coherent, or is made by the daemon on its own and invalidated
/// explicitly (`Invalidate`). So the kernel may trust what it was told for
/// long, and a hit rarely reaches the daemon for lookups and attributes.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Queued kernel invalidations; past this they are dropped (the TTL still
/// bounds staleness).
pub const INVALIDATION_QUEUE_LEN_MAX: usize = 4096;

pub struct CasFs {
    core: Arc<Core>,
    /// Set at init when the kernel supports FUSE passthrough.
    passthrough: std::sync::atomic::AtomicBool,
    backing: Mutex<Backing>,
    /// Asks for FUSE over io_uring at INIT (`uring`); set when the kernel
    /// agreed.
    ring: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Most backing files kept registered for passthrough reads (each holds the
/// blob file open in the kernel); past it, unused ones are closed.
pub const BACKING_CACHE_MAX: usize = 4096;

/// Backing files registered with the kernel for passthrough reads. The
/// kernel wants one backing id per inode while any handle uses it; a handle
/// holds a reference until its release, and the cache keeps it registered
/// for the next open of the inode (a result's blob never changes), so a hit
/// costs no registration, until the kernel forgets the inode.
///
/// Each cached backing remembers the identity of the file it was registered
/// on. An open reuses it only if the core's handle holds that same file
/// (`FileIdentity::same_file`): then the backing reads exactly the bytes the
/// core just checked on that file (same inode, so the same bytes, whatever
/// its times say). Otherwise (the inode's blob changed, or the blob's file
/// was replaced, e.g. a damaged one healed by a publication) the old backing
/// must not serve the open: the open registers the file it holds and
/// replaces the cached entry (handles still using the old backing keep it
/// until their release). While descriptors opened earlier keep the old
/// backing file attached to the inode, the kernel refuses a second one (and
/// any non-passthrough open of that inode), so such an open fails with EIO
/// until they are closed; never the old file's bytes.
///
/// Host-local tree files (`fs/local.rs`) are read and written through
/// passthrough too: every open of such an inode is a passthrough open (the
/// kernel refuses to mix the two on one inode), sharing one backing file
/// per inode while any handle holds it (`local`); the last release closes
/// it, so an unlinked scratch file's space is freed.
#[derive(Default)]
struct Backing {
    by_fh: HashMap<u64, Arc<BackingId>>,
    by_ino: HashMap<u64, (BlobId, FileIdentity, Arc<BackingId>)>,
    local: HashMap<u64, std::sync::Weak<BackingId>>,
}

impl CasFs {
    pub fn new(core: Arc<Core>) -> CasFs {
        CasFs {
            core,
            passthrough: false.into(),
            backing: Mutex::default(),
            ring: None,
        }
    }

    /// Asks the kernel for FUSE over io_uring at INIT; `agreed` tells
    /// whether it did (then `uring::run` serves the session).
    pub fn ask_for_ring(mut self, agreed: Arc<std::sync::atomic::AtomicBool>) -> CasFs {
        self.ring = Some(agreed);
        self
    }

    /// Replies to an open of a published result with passthrough: the
    /// kernel then reads the blob file itself. Falls back to a normal open.
    fn open_passthrough(&self, ino: u64, fh: u64, flags: FopenFlags, reply: ReplyOpen) {
        let Some((blob, file)) = self.core.passthrough_blob(fh) else {
            return reply.opened(FileHandle(fh), flags);
        };
        let plain = |reply: ReplyOpen| reply.opened(FileHandle(fh), flags);
        // The cached backing serves this open only if it is this blob's
        // file that the core just checked (see `Backing`).
        let same = |id: &BlobId, f: &FileIdentity| *id == blob && f.same_file(&file);
        let cached = {
            let b = self.backing.lock().unwrap();
            match b.by_ino.get(&ino) {
                Some((id, f, backing)) if same(id, f) => Some(backing.clone()),
                _ => None,
            }
        };
        let backing = match cached {
            Some(backing) => backing,
            None => {
                // Registered outside the lock (an ioctl).
                let opened = self.core.with_file(fh, |f| reply.open_backing(f));
                let fresh = match opened {
                    Ok(Ok(id)) => Arc::new(id),
                    Ok(Err(e)) => {
                        debug!(
                            "passthrough for blob {blob} refused ({e}); reading through the daemon"
                        );
                        return plain(reply);
                    }
                    Err(_) => return plain(reply),
                };
                let mut b = self.backing.lock().unwrap();
                match b.by_ino.get(&ino) {
                    // Another open of this inode registered it meanwhile.
                    Some((id, f, backing)) if same(id, f) => backing.clone(),
                    // None yet, or one on another file (see `Backing`): this
                    // one replaces it. If the old one is still in use, the
                    // kernel refuses this open (EIO) until it is released.
                    _ => {
                        if b.by_ino.len() >= BACKING_CACHE_MAX {
                            b.by_ino.retain(|_, (_, _, id)| Arc::strong_count(id) > 1);
                        }
                        b.by_ino.insert(ino, (blob, file, fresh.clone()));
                        fresh
                    }
                }
            }
        };
        self.backing
            .lock()
            .unwrap()
            .by_fh
            .insert(fh, backing.clone());
        // Passthrough reads bypass the page cache of this inode.
        reply.opened_passthrough(
            FileHandle(fh),
            flags - FopenFlags::FOPEN_KEEP_CACHE,
            &backing,
        );
    }

    /// The backing file for a handle on a host-local tree file: the one
    /// other handles of the inode use, or the handle's own descriptor,
    /// registered by `register`. None: no passthrough (refused, or off).
    fn local_backing(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if !self.passthrough.load(std::sync::atomic::Ordering::Relaxed)
            || !self.core.passthrough_local(fh)
        {
            return None;
        }
        let shared = self
            .backing
            .lock()
            .unwrap()
            .local
            .get(&ino)
            .and_then(|w| w.upgrade());
        let backing = match shared {
            Some(b) => b,
            None => match self.core.with_file(fh, register) {
                Ok(Ok(id)) => {
                    let fresh = Arc::new(id);
                    let mut b = self.backing.lock().unwrap();
                    match b.local.get(&ino).and_then(|w| w.upgrade()) {
                        // Another open of this inode registered one meanwhile.
                        Some(other) => other,
                        None => {
                            b.local.retain(|_, w| w.strong_count() > 0);
                            b.local.insert(ino, Arc::downgrade(&fresh));
                            fresh
                        }
                    }
                }
                Ok(Err(e)) => {
                    debug!("passthrough for local ino={ino} refused ({e}); through the daemon");
                    return None;
                }
                Err(_) => return None,
            },
        };
        self.backing
            .lock()
            .unwrap()
            .by_fh
            .insert(fh, backing.clone());
        Some(backing)
    }

    /// Drops a released handle's hold on its backing file (the file stays
    /// registered, cached for the next open of the inode).
    fn release_backing(&self, fh: u64) {
        self.backing.lock().unwrap().by_fh.remove(&fh);
    }
}

/// Tells the kernel what the daemon changed on its own: synchronously, or
/// through a bounded queue drained by the `invalidator` thread.
pub struct Kernel {
    notifier: Notifier,
    queue: crossbeam_channel::Sender<Invalidate>,
}

impl Kernel {
    /// Starts the invalidator thread and returns the handle for the core.
    pub fn start(notifier: Notifier) -> std::io::Result<Kernel> {
        let (queue, rx) = crossbeam_channel::bounded(INVALIDATION_QUEUE_LEN_MAX);
        let thread_notifier = notifier.clone();
        std::thread::Builder::new()
            .name("invalidator".into())
            .spawn(move || {
                for inv in rx {
                    send(&thread_notifier, &inv);
                }
            })?;
        Ok(Kernel { notifier, queue })
    }
}

impl KernelCache for Kernel {
    fn invalidate_now(&self, inv: &Invalidate) {
        send(&self.notifier, inv);
    }

    fn invalidate_later(&self, inv: Invalidate) {
        if self.queue.try_send(inv).is_err() {
            debug!("invalidation queue full; the entry TTL bounds staleness");
        }
    }
}

fn send(notifier: &Notifier, inv: &Invalidate) {
    let result = match inv {
        Invalidate::Entry(parent, name) => {
            notifier.inval_entry(INodeNo(parent.0), OsStr::from_bytes(name))
        }
        // A negative offset invalidates attributes only.
        Invalidate::Attr(ino) => notifier.inval_inode(INodeNo(ino.0), -1, 0),
        Invalidate::Data(ino) => notifier.inval_inode(INodeNo(ino.0), 0, 0),
    };
    if let Err(e) = result {
        // ENOENT just means the kernel had nothing cached.
        if e.raw_os_error() != Some(libc::ENOENT) {
            debug!("invalidate {inv:?}: {e}");
        }
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

/// A time from `setattr`. Times before 1970 are stored as 1970 (the store
/// keeps unsigned nanoseconds; no compiler cache sets them).
fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(
            st.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64),
        ),
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = to_system_time(a.mtime_ns);
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: to_system_time(a.atime_ns),
        mtime,
        ctime: to_system_time(a.ctime_ns),
        crtime: mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// The attributes of a negative entry.
const NO_ENTRY: Attr = Attr {
    ino: Ino(0),
    kind: Kind::File,
    perm: 0,
    uid: 0,
    gid: 0,
    nlink: 0,
    size: 0,
    mtime_ns: 0,
    atime_ns: 0,
    ctime_ns: 0,
    cacheable: true,
    rdev: 0,
};

fn ttl(a: &Attr) -> Duration {
    if a.cacheable {
        TTL
    } else {
        Duration::ZERO
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.code())
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn who(req: &Request) -> Who {
    Who {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// The permission an open with `flags` needs.
fn open_mask(flags: i32) -> u32 {
    let mut mask = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => MAY_READ,
        libc::O_WRONLY => MAY_WRITE,
        _ => MAY_READ | MAY_WRITE,
    };
    if flags & libc::O_TRUNC != 0 {
        mask |= MAY_WRITE;
    }
    mask
}

fn ino(i: INodeNo) -> Ino {
    Ino(i.0)
}

/// One request being served: dropped after the reply, it records how long
/// the request took and how it ended (`Stats::finish`; atomics only).
/// Every reply with an errno goes through `errno` or `posix`, which note
/// the failure.
struct Timed<'a> {
    stats: &'a crate::stats::Stats,
    op: Op,
    started: Instant,
    /// `None` while the request has not failed; else whether the failure
    /// is an operating error.
    failed: Cell<Option<bool>>,
}

impl Timed<'_> {
    /// The errno to reply with for `e`, noting the failure.
    fn errno(&self, e: &Error) -> Errno {
        self.failed.set(Some(e.is_operating_error()));
        errno(e)
    }

    /// A plain POSIX answer (`ENOSYS`, `ENOTTY`), noted as such.
    fn posix(&self, code: i32) -> Errno {
        self.failed.set(Some(false));
        Errno::from_i32(code)
    }
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        self.stats
            .finish(self.op, self.started.elapsed(), self.failed.get());
    }
}

impl CasFs {
    fn entry(&self, t: &Timed, result: Result<Attr, Error>, reply: ReplyEntry) {
        match result {
            Ok(a) => reply.entry(&ttl(&a), &file_attr(&a), Generation(0)),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn empty(&self, t: &Timed, result: Result<(), Error>, reply: ReplyEmpty) {
        self.core.send_urgent_invalidations();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    /// Starts timing a request of `op` (see `Timed`).
    fn begin(&self, op: Op) -> Timed<'_> {
        Timed {
            stats: &self.core.stats,
            op,
            started: Instant::now(),
            failed: Cell::new(None),
        }
    }
}

impl Filesystem for CasFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Lookups in one directory may run in parallel (the core's reads
        // take no lock), and symlink targets (ccache's lock files) are
        // immutable, so the kernel may cache them. `O_TRUNC` comes with the
        // open (else the kernel truncates by inode, with no handle, after the
        // open: a file whose copy-up waits for its first change would be
        // published empty before the writer writes). Never the writeback
        // cache: with it the kernel, not the daemon's clock, owns mtimes.
        let wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ATOMIC_O_TRUNC;
        if let Err(missing) = config.add_capabilities(wanted) {
            log::info!("kernel lacks FUSE capabilities {missing:?}; running without them");
        }
        if let Some(agreed) = &self.ring {
            let ok = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            agreed.store(ok, std::sync::atomic::Ordering::Relaxed);
        }
        // Reads of published results go straight to the blob file (kernel
        // >= 6.9, and the daemon needs CAP_SYS_ADMIN); otherwise through us.
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough
            .store(passthrough, std::sync::atomic::Ordering::Relaxed);
        log::info!(
            "FUSE passthrough for result reads: {}",
            if passthrough {
                "on"
            } else {
                "off (kernel lacks it): reads go through the daemon"
            }
        );
        Ok(())
    }

    fn destroy(&mut self) {
        self.core.shutdown();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = self.begin(Op::Lookup);
        let r = self
            .core
            .permit(&who(req), ino(parent), MAY_EXEC)
            .and_then(|_| self.core.lookup(ino(parent), name.as_bytes()));
        match r {
            // A negative entry (inode 0) the kernel may cache: a name that
            // appears later either comes through the kernel or is invalidated,
            // except a name bound at close (not cached: see `binds_at_close`).
            Err(e) if e.code() == libc::ENOENT && !ino(parent).is_virtual() => {
                let ttl = if self.core.binds_at_close(ino(parent), name.as_bytes()) {
                    Duration::ZERO
                } else {
                    self.core.negative_ttl().unwrap_or(TTL)
                };
                reply.entry(&ttl, &file_attr(&NO_ENTRY), Generation(0))
            }
            r => self.entry(&t, r, reply),
        }
    }

    fn forget(&self, _req: &Request, i: INodeNo, nlookup: u64) {
        let _t = self.begin(Op::Forget);
        // The kernel sends FORGET when it drops the inode (and for lookups it
        // did not use): a cached backing file no open handle uses goes too,
        // so an evicted blob's disk space is freed. One still in use stays:
        // the kernel may still hold the inode with it attached.
        let mut b = self.backing.lock().unwrap();
        if b.by_ino
            .get(&i.0)
            .is_some_and(|(_, _, id)| Arc::strong_count(id) == 1)
        {
            b.by_ino.remove(&i.0);
        }
        drop(b);
        self.core.forget(ino(i), nlookup);
    }

    fn getattr(&self, _req: &Request, i: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let t = self.begin(Op::Getattr);
        match self.core.getattr_fh(ino(i), fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        i: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t = self.begin(Op::Setattr);
        let mut set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        let writer = fh.is_some_and(|fh| self.core.opened_for_writing(fh.0));
        let result = self
            .core
            .setattr_prepare(&who(req), ino(i), &mut set, writer)
            .and_then(|_| match (size, fh) {
                (Some(size), Some(fh)) => self.core.before_truncate(fh.0, size),
                _ => Ok(()),
            })
            .and_then(|_| self.core.setattr(ino(i), set));
        self.core.send_urgent_invalidations();
        match result {
            Ok(a) => reply.attr(&ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, i: INodeNo, reply: ReplyData) {
        let t = self.begin(Op::Readlink);
        match self.core.readlink(ino(i)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let t = self.begin(Op::Mkdir);
        let r = self
            .core
            .permit(&who(req), ino(parent), MAY_WRITE | MAY_EXEC)
            .and_then(|_| {
                self.core
                    .mkdir(ino(parent), name.as_bytes(), mode & !umask, caller(req))
            });
        self.entry(&t, r, reply);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = self.begin(Op::Unlink);
        let (p, n) = (ino(parent), name.as_bytes());
        let r = self
            .core
            .permit_remove(&who(req), p, n)
            .and_then(|_| self.core.unlink(p, n));
        self.empty(&t, r, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = self.begin(Op::Rmdir);
        let (p, n) = (ino(parent), name.as_bytes());
        let r = self
            .core
            .permit_remove(&who(req), p, n)
            .and_then(|_| self.core.rmdir(p, n));
        self.empty(&t, r, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let t = self.begin(Op::Symlink);
        let r = self
            .core
            .permit(&who(req), ino(parent), MAY_WRITE | MAY_EXEC)
            .and_then(|_| {
                self.core.symlink(
                    ino(parent),
                    link_name.as_bytes(),
                    target.as_os_str().as_bytes(),
                    caller(req),
                )
            });
        self.entry(&t, r, reply);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let t = self.begin(Op::Other);
        let mode = mode & (libc::S_IFMT | (0o7777 & !umask));
        let r = self
            .core
            .permit(&who(req), ino(parent), MAY_WRITE | MAY_EXEC)
            .and_then(|_| {
                self.core
                    .mknod(ino(parent), name.as_bytes(), mode, rdev, caller(req))
            });
        self.core.send_urgent_invalidations();
        self.entry(&t, r, reply);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let t = self.begin(Op::Rename);
        let r = self
            .core
            .permit_rename(
                &who(req),
                (ino(parent), name.as_bytes()),
                (ino(newparent), newname.as_bytes()),
            )
            .and_then(|_| {
                self.core.rename(
                    ino(parent),
                    name.as_bytes(),
                    ino(newparent),
                    newname.as_bytes(),
                    flags.bits(),
                )
            });
        self.empty(&t, r, reply);
    }

    fn link(
        &self,
        req: &Request,
        i: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let t = self.begin(Op::Link);
        let r = self
            .core
            .permit(&who(req), ino(newparent), MAY_WRITE | MAY_EXEC)
            .and_then(|_| self.core.link(ino(i), ino(newparent), newname.as_bytes()));
        self.entry(&t, r, reply);
    }

    fn open(&self, req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let t = self.begin(Op::Open);
        let r = self
            .core
            .permit(&who(req), ino(i), open_mask(flags.0))
            .and_then(|_| self.core.open(ino(i), flags.0));
        match r {
            Ok((fh, direct)) => {
                // Pages stay cached across opens: bytes change only through
                // this kernel, or the daemon invalidates them (`Invalidate::Data`).
                let mut f = if direct {
                    FopenFlags::FOPEN_DIRECT_IO
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE
                };
                // A read-only handle has nothing to do at close: skip FLUSH.
                let read_only =
                    flags.0 & libc::O_ACCMODE == libc::O_RDONLY && flags.0 & libc::O_TRUNC == 0;
                if read_only || self.core.close_is_silent(fh) {
                    f |= FopenFlags::FOPEN_NOFLUSH;
                }
                if let Some(b) = self.local_backing(i.0, fh, |file| reply.open_backing(file)) {
                    return reply.opened_passthrough(
                        FileHandle(fh),
                        f - FopenFlags::FOPEN_KEEP_CACHE,
                        &b,
                    );
                }
                if read_only
                    && !direct
                    && self.passthrough.load(std::sync::atomic::Ordering::Relaxed)
                {
                    return self.open_passthrough(i.0, fh, f, reply);
                }
                reply.opened(FileHandle(fh), f)
            }
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t = self.begin(Op::Read);
        match self.core.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let t = self.begin(Op::Write);
        match self.core.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let t = self.begin(Op::Flush);
        self.empty(&t, self.core.flush(fh.0), reply);
    }

    fn release(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.begin(Op::Release);
        let result = self.core.release(fh.0);
        self.release_backing(fh.0);
        self.empty(&t, result, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.begin(Op::Fsync);
        self.empty(&t, self.core.fsync(fh.0), reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let t = self.begin(Op::Other);
        self.empty(&t, self.core.fallocate(fh.0, offset, length, mode), reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let t = self.begin(Op::Other);
        match self.core.lseek(fh.0, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn opendir(&self, req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let t = self.begin(Op::Opendir);
        let r = self
            .core
            .permit(&who(req), ino(i), MAY_READ)
            .and_then(|_| self.core.opendir(ino(i)));
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let t = self.begin(Op::Readdir);
        match self.core.readdir_at(fh.0, offset) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(
                        INodeNo(e.ino.0),
                        i as u64 + 1,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _t = self.begin(Op::Releasedir);
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _t = self.begin(Op::Fsync);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        let t = self.begin(Op::Statfs);
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.bfree,
                s.bavail,
                s.files,
                s.ffree,
                s.bsize,
                NAME_BYTES_MAX as u32,
                s.bsize,
            ),
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    fn access(&self, req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let t = self.begin(Op::Access);
        let mask = mask.bits() as u32 & (MAY_READ | MAY_WRITE | MAY_EXEC);
        let r = self
            .core
            .access(ino(i))
            .and_then(|_| self.core.permit(&who(req), ino(i), mask));
        self.empty(&t, r, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let t = self.begin(Op::Create);
        let r = self
            .core
            .permit(&who(req), ino(parent), MAY_WRITE | MAY_EXEC)
            .and_then(|_| {
                self.core.create(
                    ino(parent),
                    name.as_bytes(),
                    mode & !umask,
                    flags,
                    caller(req),
                )
            });
        match r {
            Ok((a, fh)) => {
                // Host-local files have nothing to publish at close.
                let mut f = FopenFlags::FOPEN_KEEP_CACHE;
                if self.core.close_is_silent(fh) {
                    f |= FopenFlags::FOPEN_NOFLUSH;
                }
                if let Some(b) = self.local_backing(a.ino.0, fh, |file| reply.open_backing(file)) {
                    return reply.created_passthrough(
                        &ttl(&a),
                        &file_attr(&a),
                        Generation(0),
                        FileHandle(fh),
                        f - FopenFlags::FOPEN_KEEP_CACHE,
                        &b,
                    );
                }
                reply.created(&ttl(&a), &file_attr(&a), Generation(0), FileHandle(fh), f)
            }
            Err(e) => reply.error(t.errno(&e)),
        }
    }

    // Extended attributes are not supported. ENOSYS (rather than ENOTSUP)
    // makes the kernel remember that and answer EOPNOTSUPP itself, so the
    // security.capability probe on every write stops reaching the daemon.
    fn getxattr(&self, _req: &Request, _i: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        let t = self.begin(Op::Xattr);
        reply.error(t.posix(libc::ENOSYS));
    }

    fn listxattr(&self, _req: &Request, _i: INodeNo, _size: u32, reply: ReplyXattr) {
        let t = self.begin(Op::Xattr);
        reply.error(t.posix(libc::ENOSYS));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let t = self.begin(Op::Xattr);
        reply.error(t.posix(libc::ENOSYS));
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let t = self.begin(Op::Xattr);
        reply.error(t.posix(libc::ENOSYS));
    }

    /// No ioctls: `isatty()` on a cache file asks TCGETS, which is ENOTTY.
    fn ioctl(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let t = self.begin(Op::Other);
        reply.error(t.posix(libc::ENOTTY));
    }
}
