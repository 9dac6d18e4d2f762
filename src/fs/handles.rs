//! Open files: the handle table, open/create, read/write, flush/release,
//! fallocate and SEEK_DATA/SEEK_HOLE.
//!
//! Invariants:
//! - For every open or create there is exactly one release; a handle holds
//!   its own descriptor on the blob or staging file, so what it reads never
//!   changes under it (published blobs are immutable).
//! - A handle open for writing counts as a writer in `usage` until its bytes
//!   are published or it is released; the last writer's close publishes.
//!   A write open of a published (non-result) file copies it up only at its
//!   first change (`restage`), so an open that changes nothing, or whose
//!   change fails, leaves the file, its times and the store as they were.
//! - A blob is verified against its hash at its first open in this mount
//!   (on the configured sample), outside any lock; then it is remembered in
//!   `verified` (bounded) with the identity of its file, and not hashed again
//!   on open while the file it opens has that identity. A file that changed
//!   since (written, truncated, touched, replaced) is hashed again before the
//!   open returns, whatever the sample says (`open_verified`).
//! - What an already-open descriptor sees: its own descriptor on the blob
//!   file it opened (promise 2). If someone outside casfs writes into that
//!   file, the descriptor sees those bytes: nothing can take back what an
//!   open descriptor reads (with passthrough the kernel reads the file
//!   itself). What casfs does: the next open or the scrub finds the damage,
//!   quarantines the blob and drops its names (`drop_corrupt`), or a
//!   publication of the same bytes replaces the file (`settle_blob_file`);
//!   either way no new open gets the damaged file, while descriptors already
//!   open keep it until they are closed.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use log::{debug, warn};

use crate::classes::Class;
use crate::error::{Error, Result};
use crate::fs::locks::Sharded;
use crate::fs::publish::Share;
use crate::fs::txn::After;
use crate::fs::{Attr, Caller, Core, Invalidate, RETRIES_MAX};
use crate::stats::Stats;
use crate::store::blobs::{Blobs, FileIdentity};
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{Content, Inode, Kind, PendingReason};

/// Whether host-local files are read and written through FUSE passthrough
/// (see `Core::passthrough_local`).
const LOCAL_PASSTHROUGH: bool = false;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Read,
    /// Writes go to the staging file.
    Write,
    /// A write open of a published result: reads see the result, writes are
    /// accepted and discarded (create-only), counted once as a conflict.
    Discard,
}

#[derive(PartialEq, Eq)]
enum Restage {
    Discarded,
    Restaged,
    AlreadyRestaged,
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
    /// handle stays open (a duplicated descriptor), or when it was opened
    /// for writing on a published file and has not changed it yet: a later
    /// write through it starts a new version (`restage`) instead of
    /// touching the blob.
    published: AtomicBool,
    /// Set when this handle created its file under a create-only name and a
    /// close through it bound the name while the handle stays open (the
    /// shell's `dup2` onto stdout, a forked child's exit). Its later writes
    /// are the same writer going on, not a write into someone's result: they
    /// are published again at the next close, and the name is shared with
    /// other hosts only when the last reference goes (`release`).
    bound_at_close: AtomicBool,
    conflict_counted: AtomicBool,
    /// For a read of a published result: its blob, which never changes,
    /// so the kernel may read the blob file directly (passthrough), and the
    /// identity of the file this handle opened (and verified, or trusted).
    immutable_blob: Option<(BlobId, FileIdentity)>,
    /// A writer of a host-local file: nothing to publish at close, so the
    /// kernel is told to skip FLUSH, and each write stamps the mtime.
    local_writer: bool,
}

/// Open handles by number (a leaf table).
pub(super) struct HandleTable {
    map: Sharded<u64, Arc<Handle>>,
}

impl HandleTable {
    pub fn new() -> HandleTable {
        HandleTable {
            map: Sharded::new(),
        }
    }
}

impl Core {
    fn new_handle(
        &self,
        ino: Ino,
        mode: Mode,
        file: Option<File>,
        virt: Option<Vec<u8>>,
        immutable_blob: Option<(BlobId, FileIdentity)>,
    ) -> u64 {
        let fh = self.next_fh();
        let h = Handle {
            ino,
            mode,
            file: RwLock::new(file),
            virt,
            published: AtomicBool::new(false),
            bound_at_close: AtomicBool::new(false),
            conflict_counted: AtomicBool::new(false),
            immutable_blob,
            local_writer: false,
        };
        self.handles.map.with(&fh, |m| m.insert(fh, Arc::new(h)));
        fh
    }

    /// For a handle reading a published result: its blob, which never
    /// changes, so the kernel may read the blob file directly (passthrough),
    /// and the identity of the file the handle holds (the one this open
    /// verified or found trusted): a backing file registered earlier may be
    /// used for it only if it is that same file.
    pub fn passthrough_blob(&self, fh: u64) -> Option<(BlobId, FileIdentity)> {
        self.handle(fh).ok()?.immutable_blob
    }

    /// Runs `f` on the handle's file (for registering it with the kernel).
    pub fn with_file<R>(&self, fh: u64, f: impl FnOnce(&File) -> R) -> Result<R> {
        let h = self.handle(fh)?;
        let guard = h.file.read().unwrap();
        match guard.as_ref() {
            Some(file) => Ok(f(file)),
            None => Err(Error::errno(libc::EISDIR)),
        }
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles
            .map
            .with(&fh, |m| m.get(&fh).cloned())
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
            self.usage.open(ino, false);
            return Ok((
                self.new_handle(ino, Mode::Read, None, Some(bytes), None),
                true,
            ));
        }
        let ino = self.resolve(ino);
        if ino.is_local() {
            if write {
                self.writable()?;
            }
            let file = self.local_open_file(ino, flags)?;
            return Ok((self.local_new_handle(ino, file, write), false));
        }
        // A name shown from its shared record gets its contents now
        // (fetched and verified, no lock held).
        self.materialize(ino)?;
        // A shared mutable entry past its freshness bound is checked against
        // the tier first (no lock held).
        self.refresh_shared_ino(ino);
        if write {
            self.writable()?;
            // Until its first change a writer reads the published blob: it
            // is checked as a reader's open would check it.
            if flags & libc::O_TRUNC == 0 {
                let inode = self.inode(ino)?;
                if let Content::Blob(id) = inode.content {
                    self.open_verified(&inode, id)?;
                }
            }
            return self
                .open_write(ino, flags & libc::O_TRUNC != 0)
                .map(|fh| (fh, false));
        }
        for _ in 0..RETRIES_MAX {
            let inode = self.inode(ino)?;
            let (file, immutable_blob) = match &inode.content {
                Content::None if inode.kind == Kind::Dir => (None, None),
                Content::Blob(id) => match self.open_verified(&inode, *id)? {
                    Some((f, ident)) => (
                        Some(f),
                        (inode.class == Class::Result).then_some((*id, ident)),
                    ),
                    // Its content changed meanwhile, or its file was being
                    // written while it was hashed.
                    None => continue,
                },
                Content::Staged => match self.blobs.open_staging(ino, false) {
                    Ok(f) => (Some(f), None),
                    Err(_) if self.inode(ino)?.content != Content::Staged => continue,
                    Err(e) => return Err(self.count_error(e)),
                },
                _ => (None, None),
            };
            if immutable_blob.is_some() {
                Stats::bump(&self.stats.counters.result_opens);
            }
            self.usage.open(ino, false);
            return Ok((
                self.new_handle(ino, Mode::Read, file, None, immutable_blob),
                false,
            ));
        }
        Err(Error::with_context(
            libc::EAGAIN,
            format!("open ino={ino}: content kept changing"),
        ))
    }

    /// A handle on a host-local tree file (`local.rs`): its descriptor, and
    /// nothing for the daemon to do at close.
    fn local_new_handle(&self, ino: Ino, file: File, write: bool) -> u64 {
        self.usage.open(ino, write);
        let _ = self.local_handle(ino, true);
        let mode = if write { Mode::Write } else { Mode::Read };
        let fh = self.new_handle(ino, mode, Some(file), None, None);
        if write {
            self.set_local_writer(fh);
        }
        fh
    }

    /// For a handle on a host-local tree file: whether its descriptor may
    /// serve the kernel directly (passthrough). Off: measured, it saves the
    /// READ and WRITE of ccache's `stats` rewrite (24.1 -> 21.1 requests per
    /// hit), but writes through passthrough bypass the daemon's free-space
    /// reserve (`check_space`, which keeps the metadata database working
    /// on a filling disk) and its error counting (`tests/mount_full_disk.rs`),
    /// and passthrough reads only would make a write open fail while a
    /// reader holds the inode (the kernel refuses to mix the two).
    pub fn passthrough_local(&self, _fh: u64) -> bool {
        LOCAL_PASSTHROUGH
    }

    /// The attributes of `ino`, through handle `fh` when it is a host-local
    /// file's (its descriptor answers also once its last name is gone).
    pub fn getattr_fh(&self, ino: Ino, fh: Option<u64>) -> Result<Attr> {
        if let (true, Some(h)) = (ino.is_local(), fh.and_then(|fh| self.handle(fh).ok())) {
            if h.ino == ino {
                if let Some(f) = h.file.read().unwrap().as_ref() {
                    return Self::local_fstat(ino, f);
                }
            }
        }
        self.getattr(ino)
    }

    /// Opens for writing: a writer of a published result is a `Discard`
    /// handle; anything else writes its staging file. A blob is copied up
    /// at the first write, not at open (`restage`): an open for writing
    /// that writes nothing (`touch`) changes nothing.
    fn open_write(&self, ino: Ino, truncate: bool) -> Result<u64> {
        // Counted as a writer first: no publication may seal it from now on.
        self.usage.open(ino, true);
        let result = self.open_write_locked(ino, truncate);
        match result {
            Ok((file, Mode::Write, local, published)) => {
                let fh = self.new_handle(ino, Mode::Write, Some(file), None, None);
                if local {
                    self.set_local_writer(fh);
                }
                if published {
                    self.handle(fh)?.published.store(true, Ordering::Release);
                    self.usage.writer_done(ino);
                }
                Ok(fh)
            }
            Ok((file, mode, _, _)) => {
                self.usage.writer_done(ino);
                let fh = self.new_handle(ino, mode, Some(file), None, None);
                if truncate {
                    Stats::bump(&self.stats.counters.conflicts);
                    self.handle(fh)?
                        .conflict_counted
                        .store(true, Ordering::Relaxed);
                }
                Ok(fh)
            }
            Err(e) => {
                self.usage.close(ino, true);
                Err(e)
            }
        }
    }

    /// The file to write, the mode, whether it is host-local, and whether
    /// it is still the published blob (copied up at the first write).
    fn open_write_locked(&self, ino: Ino, truncate: bool) -> Result<(File, Mode, bool, bool)> {
        let _g = self.lock(&[ino]);
        let mut inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            return Err(Error::errno(libc::EISDIR));
        }
        let mut txn = self.txn();
        match (&inode.content, inode.class) {
            (Content::Blob(id), Class::Result) => {
                Ok((self.open_blob(id)?, Mode::Discard, false, false))
            }
            (Content::Blob(id), class) if !truncate => Ok((
                self.open_blob(id)?,
                Mode::Write,
                class == Class::Local,
                true,
            )),
            (Content::Blob(id), _) => {
                let id = *id;
                self.lock_blobs(&mut txn, &[id]);
                self.copy_up(&mut txn, &mut inode, if truncate { Some(0) } else { None })?;
                inode.stamp(self.now());
                txn.batch.put_inode(&inode);
                self.commit(txn)?;
                let local = inode.class == Class::Local;
                Ok((
                    self.blobs.open_staging(ino, true)?,
                    Mode::Write,
                    local,
                    false,
                ))
            }
            (Content::Staged, class) => {
                let file = self.blobs.open_staging(ino, true)?;
                if truncate {
                    file.set_len(0).map_err(|e| Error::io(e, "truncate"))?;
                    inode.stamp(self.now());
                    inode.size = 0;
                    txn.batch.put_inode(&inode);
                }
                if class.is_blob() && inode.nlink > 0 {
                    txn.batch.put_pending(ino, PendingReason::Unsealed);
                }
                self.commit(txn)?;
                Ok((file, Mode::Write, class == Class::Local, false))
            }
            _ => Err(Error::errno(libc::EINVAL)),
        }
    }

    /// Opens a blob, verifying it at its first open (on the configured
    /// sample), and again whenever its file is not the file that was
    /// verified (the rule of the verified set: see `verified.rs`). A blob
    /// that fails is quarantined and its names dropped: the open fails with
    /// EIO. None: the inode no longer points at `id`, or the file changed
    /// while it was hashed (the caller opens again). Returns the descriptor
    /// and the identity it had when it was checked.
    fn open_verified(&self, inode: &Inode, id: BlobId) -> Result<Option<(File, FileIdentity)>> {
        let file = match self.open_blob(&id) {
            Ok(f) => f,
            Err(e) => {
                if self.store.inode(inode.ino)?.map(|i| i.content) != Some(Content::Blob(id)) {
                    return Ok(None);
                }
                warn!("blob {id} of ino={} is missing: {e}", inode.ino);
                self.drop_corrupt(id)?;
                return Err(Error::with_context(
                    libc::EIO,
                    format!("blob {id} is missing"),
                ));
            }
        };
        let ident = FileIdentity::of(&file).map_err(|e| self.count_error(e))?;
        let changed = match self.remembered(&id) {
            Some(r) if r == ident => return Ok(Some((file, ident))),
            Some(r) => {
                debug!(
                    "open blob={id} ino={}: its file changed since it was verified (was {r:?}, now {ident:?}); hashing it again",
                    inode.ino
                );
                true
            }
            None => false,
        };
        if !changed && !self.should_verify() {
            return Ok(Some((file, ident)));
        }
        match self.hash_blob_file(&id, &file, &ident)? {
            Some(true) => Ok(Some((file, ident))),
            Some(false) => {
                warn!(
                    "corrupt blob={id} ino={} name={:?}: bytes do not match the hash; quarantined",
                    inode.ino,
                    String::from_utf8_lossy(&inode.name)
                );
                self.drop_corrupt(id)?;
                Err(Error::errno(libc::EIO))
            }
            None => {
                debug!("open blob={id}: its file changed while it was hashed; opening again");
                Ok(None)
            }
        }
    }

    pub fn create(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64)> {
        self.create_name(parent, name, mode, flags, caller)
            .map(|(a, fh)| (self.shown(a), fh))
    }

    fn create_name(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64)> {
        self.check_new_name(parent, name)?;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if let Some((attr, file, created)) = self.local_create(parent, name, mode, flags, caller)? {
            // A created file's handle writes, as every create's does (the
            // kernel checks the caller's access mode itself).
            let fh = self.local_new_handle(attr.ino, file, write || created);
            return Ok((attr, fh));
        }
        if let Some(attr) = self.local_lookup(parent, name)? {
            // A tree name whose path is in a shared class now (its
            // directory was renamed): opened as it is.
            if flags & libc::O_EXCL != 0 {
                self.local_forget(attr.ino, 1);
                return Err(Error::errno(libc::EEXIST));
            }
            let file = self.local_open_file(attr.ino, flags)?;
            return Ok((attr.clone(), self.local_new_handle(attr.ino, file, write)));
        }
        if let Some(existing) = self.store.dentry(parent, name)? {
            if flags & libc::O_EXCL != 0 {
                return Err(Error::errno(libc::EEXIST));
            }
            let (fh, _) = self.open(existing, flags)?;
            let attr = self.getattr(existing)?;
            self.usage.remember(existing);
            return Ok((attr, fh));
        }
        self.check_space(0)?;
        let class = self.class_of(parent, name)?;
        let ino = self.alloc_ino()?;
        let file = self.blobs.create_staging(ino)?;
        let result = self.create_locked(parent, name, mode, caller, class, ino);
        let inode = match result {
            Ok(inode) => inode,
            Err(e) => {
                self.blobs.remove_staging(ino);
                return Err(e);
            }
        };
        let fh = self.new_handle(ino, Mode::Write, Some(file), None, None);
        if inode.class == Class::Local {
            self.set_local_writer(fh);
        }
        Ok((self.attr_of(&inode), fh))
    }

    fn set_local_writer(&self, fh: u64) {
        self.handles.map.with(&fh, |m| {
            if let Some(h) = m.get_mut(&fh).and_then(Arc::get_mut) {
                h.local_writer = true;
            }
        });
    }

    /// True if `fh` is a handle opened for writing: a truncate through it
    /// (`ftruncate`) needs no other permission, as on Linux (write access
    /// was checked when it was opened).
    pub fn opened_for_writing(&self, fh: u64) -> bool {
        self.handle(fh).is_ok_and(|h| h.mode != Mode::Read)
    }

    /// True if closing `fh` has nothing for the daemon to do (the kernel
    /// may skip FLUSH): read-only handles, discarding writers, and writers
    /// of host-local files (whose mtime every write stamps).
    pub fn close_is_silent(&self, fh: u64) -> bool {
        self.handle(fh)
            .is_ok_and(|h| h.mode != Mode::Write || h.local_writer)
    }

    fn create_locked(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        caller: Caller,
        class: Class,
        ino: Ino,
    ) -> Result<Inode> {
        let _g = self.lock(&[parent]);
        if self.store.dentry(parent, name)?.is_some() {
            return Err(Error::errno(libc::EEXIST));
        }
        let dir = self.inode(parent)?;
        let mut txn = self.txn();
        let now = self.now();
        let perm = (mode & 0o7777) as u16;
        let mut inode = self.new_inode(ino, Kind::File, class, perm, caller, &dir, name, now);
        inode.content = Content::Staged;
        let awaiting_bind = matches!(class, Class::Result | Class::CcacheEntry);
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
            }
        }
        txn.batch.put_inode(&inode);
        if inode.nlink > 0 {
            self.touch_dir(&mut txn, dir, now);
        }
        self.usage.remember(ino);
        self.usage.open(ino, true);
        self.usage.set_awaiting_bind(ino, awaiting_bind);
        if let Err(e) = self.commit(txn) {
            self.usage.set_awaiting_bind(ino, false);
            self.usage.close(ino, true);
            self.usage.forget(ino, 1);
            return Err(e);
        }
        Ok(inode)
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
                self.check_space(data.len() as u64)?;
                let guard = h.file.read().unwrap();
                let file = guard.as_ref().expect("write handles hold a file");
                file.write_all_at(data, offset).map_err(|e| {
                    self.count_error(Error::io(e, format_args!("write ino={}", h.ino)))
                })?;
                drop(guard);
                self.wrote(&h)?;
                Ok(data.len() as u32)
            }
        }
    }

    /// A write through a handle whose bytes were already published: a
    /// result keeps its published bytes (the write is discarded, counted as
    /// a conflict: returns true); anything else is copied back to a staging
    /// file that this handle writes from now on, published again at close.
    fn restage(&self, h: &Handle) -> Result<bool> {
        self.restage_to(h, None)
    }

    /// `restage`, with the copy truncated to `len` if given (nothing past it
    /// is copied; a size the store's filesystem refuses fails first).
    fn restage_to(&self, h: &Handle, len: Option<u64>) -> Result<bool> {
        if h.published.load(Ordering::Acquire) && len != Some(0) {
            self.check_before_copy(h.ino)?;
        }
        // Counted as a writer (after any seal of it ends) before the lock.
        self.usage.writer_again(h.ino);
        let result = self.restage_locked(h, len);
        if !matches!(result, Ok(Restage::Restaged)) {
            self.usage.writer_done(h.ino);
        }
        result.map(|r| r == Restage::Discarded)
    }

    /// Before a published file is copied up for a writer (no lock held):
    /// its blob is hashed whole, and a damaged one is dropped like at any
    /// open that finds damage (the writer gets EIO, the name goes). The
    /// copy itself checks again (`copy_up`), for a blob that changes in
    /// between.
    pub(super) fn check_before_copy(&self, ino: Ino) -> Result<()> {
        let inode = self.inode(ino)?;
        let Content::Blob(id) = inode.content else {
            return Ok(());
        };
        if inode.class == Class::Result {
            return Ok(()); // never copied: its writers discard
        }
        let intact = match self.blobs.open_blob(&id) {
            Ok(f) => Blobs::verify(&f, &id)?,
            Err(_) => return Ok(()), // gone meanwhile; the copy says so
        };
        if intact {
            return Ok(());
        }
        warn!(
            "corrupt blob={id} ino={ino} name={:?}: bytes do not match the hash; not copied for writing, quarantined",
            String::from_utf8_lossy(&inode.name)
        );
        self.drop_corrupt(id)?;
        Err(Error::with_context(
            libc::EIO,
            format!("blob {id} is damaged (its bytes do not match its hash)"),
        ))
    }

    fn restage_locked(&self, h: &Handle, len: Option<u64>) -> Result<Restage> {
        let _g = self.lock(&[h.ino]);
        if !h.published.load(Ordering::Acquire) {
            return Ok(Restage::AlreadyRestaged); // another write got here first
        }
        let mut inode = self.inode(h.ino)?;
        let continues = h.bound_at_close.load(Ordering::Acquire) && inode.nlink > 0;
        match (&inode.content, inode.class) {
            (Content::Blob(_), Class::Result) if !continues => {
                if !h.conflict_counted.swap(true, Ordering::Relaxed) {
                    Stats::bump(&self.stats.counters.conflicts);
                    debug!("write ino={} outcome=discarded-after-publication", h.ino);
                }
                return Ok(Restage::Discarded);
            }
            (Content::Blob(id), _) => {
                let id = *id;
                let mut txn = self.txn();
                self.lock_blobs(&mut txn, &[id]);
                self.copy_up(&mut txn, &mut inode, len)?;
                inode.stamp(self.now());
                txn.batch.put_inode(&inode);
                self.commit(txn)?;
            }
            (Content::Staged, _) => {}
            _ => return Err(Error::errno(libc::EBADF)),
        }
        *h.file.write().unwrap() = Some(self.blobs.open_staging(h.ino, true)?);
        h.published.store(false, Ordering::Release);
        Ok(Restage::Restaged)
    }

    /// After a change through `h`: a host-local file's mtime is now (what
    /// FLUSH would have recorded at close, for writers the kernel closes
    /// silently); any other file's is stamped at the next FLUSH.
    fn wrote(&self, h: &Handle) -> Result<()> {
        if h.ino.is_local() {
            return Ok(()); // the tree file's own mtime moved
        }
        if h.local_writer {
            self.stamp_mtime(h.ino)
        } else {
            self.usage.mark_written(h.ino);
            Ok(())
        }
    }

    /// A write to a host-local file: its mtime is now.
    fn stamp_mtime(&self, ino: Ino) -> Result<()> {
        let _g = self.lock(&[ino]);
        let Some(mut inode) = self.store.inode(ino)? else {
            return Ok(());
        };
        if inode.content != Content::Staged {
            return Ok(());
        }
        let mut txn = self.txn();
        inode.stamp(self.now());
        txn.batch.put_inode(&inode);
        self.commit(txn)
    }

    /// On close: record size and mtime; if this was the last writer of a
    /// shared-class file, publish it now so close() reports any failure.
    ///
    /// FLUSH comes for every close() of every descriptor, RELEASE only when
    /// the last one goes; writes may still arrive through a duplicate after
    /// a FLUSH. Such writes are never discarded: `restage` starts a new
    /// version that the next FLUSH or the RELEASE publishes (see
    /// `bound_at_close` for files created under a create-only name).
    pub fn flush(&self, fh: u64) -> Result<()> {
        let h = self.handle(fh)?;
        if h.mode != Mode::Write || h.published.load(Ordering::Acquire) || h.ino.is_local() {
            return Ok(());
        }
        // Written since the mtime was last stamped or set by a client (a
        // time set after the last write, `cp -a`'s futimens, stands).
        if self.usage.take_written(h.ino) {
            let _g = self.lock(&[h.ino]);
            if let Some(mut inode) = self.store.inode(h.ino)? {
                if inode.content == Content::Staged {
                    let mut txn = self.txn();
                    inode.stamp(self.now());
                    inode.size = h
                        .file
                        .read()
                        .unwrap()
                        .as_ref()
                        .and_then(|f| f.metadata().ok())
                        .map_or(inode.size, |m| m.size());
                    txn.batch.put_inode(&inode);
                    txn.after.push(After::Invalidate(Invalidate::Attr(h.ino)));
                    self.commit(txn)?;
                }
            }
        }
        if self.usage.writers(h.ino) > 1 {
            return Ok(());
        }
        let Some(inode) = self.store.inode(h.ino)? else {
            return Ok(());
        };
        if inode.content != Content::Staged || !inode.class.is_blob() {
            return Ok(());
        }
        // This handle writes no more: publication sees a stable file.
        if h.published.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.usage.writer_done(h.ino);
        let binds = self.usage.awaiting_bind(h.ino);
        // The handle may live on (a duplicate): share a result it binds only
        // at release, so another host never gets a version it goes on to
        // replace.
        let share = if binds || h.bound_at_close.load(Ordering::Acquire) {
            Share::AtRelease
        } else {
            Share::Now
        };
        self.publish_if_idle(h.ino, share)?;
        if binds && !self.usage.awaiting_bind(h.ino) {
            h.bound_at_close.store(true, Ordering::Release);
        }
        Ok(())
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let Some(h) = self.handles.map.with(&fh, |m| m.remove(&fh)) else {
            return Err(Error::errno(libc::EBADF));
        };
        let ino = h.ino;
        let was_writer = h.mode == Mode::Write && !h.published.load(Ordering::Acquire);
        self.usage.close(ino, was_writer);
        if ino.is_virtual() {
            return Ok(());
        }
        if ino.is_local() {
            return self.local_handle(ino, false);
        }
        let result = if was_writer {
            self.publish_if_idle(ino, Share::Now)
        } else if h.bound_at_close.load(Ordering::Acquire) {
            self.share_published(ino)
        } else {
            Ok(())
        };
        drop(h);
        self.maybe_forget(ino)?;
        result
    }

    /// Before a truncate through `fh` (`ftruncate`): a handle that has not
    /// changed a published file yet (or whose bytes were published while it
    /// stays open) copies it up first, truncated to `size`, and becomes its
    /// writer again, so the truncated file is published at the handle's
    /// close like any write, never on its own in between.
    pub fn before_truncate(&self, fh: u64, size: u64) -> Result<()> {
        let Ok(h) = self.handle(fh) else {
            return Ok(()); // the truncate goes by inode
        };
        if h.mode != Mode::Write || !h.published.load(Ordering::Acquire) {
            return Ok(());
        }
        self.restage_to(&h, Some(size)).map(|_| ())
    }

    /// `fallocate(2)` through an open handle: preallocation (which extends
    /// the size unless `FALLOC_FL_KEEP_SIZE`), hole punching and zeroing
    /// change the staging file in place, as writes do (the kernel sends no
    /// other modes). A discarding writer of a published result accepts and
    /// discards it like a write (create-only).
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let h = self.handle(fh)?;
        match h.mode {
            Mode::Read => return Err(Error::errno(libc::EBADF)),
            Mode::Discard => {
                if !h.conflict_counted.swap(true, Ordering::Relaxed) {
                    Stats::bump(&self.stats.counters.conflicts);
                    debug!(
                        "fallocate ino={} outcome=discarded-onto-existing-result",
                        h.ino
                    );
                }
                return Ok(());
            }
            Mode::Write => {}
        }
        if h.published.load(Ordering::Acquire) && self.restage(&h)? {
            return Ok(());
        }
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Err(Error::errno(libc::EFBIG));
        };
        if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 {
            self.check_space(length)?;
        }
        let guard = h.file.read().unwrap();
        let file = guard.as_ref().expect("write handles hold a file");
        // SAFETY: plain fallocate(2) on a descriptor this handle owns.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                // What the caller asked for, not a failure of the store.
                Some(code @ (libc::EFBIG | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSPC)) => {
                    Error::errno(code)
                }
                _ => self.count_error(Error::io(e, format_args!("fallocate ino={}", h.ino))),
            });
        }
        drop(guard);
        self.wrote(&h)?;
        Ok(())
    }

    /// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE` (the kernel answers the
    /// other whences itself): asked of the file the handle reads, so holes
    /// punched or never written are found as on the store's filesystem.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.handle(fh)?;
        if let Some(v) = &h.virt {
            // All data, then the implicit hole at the end.
            let len = v.len() as i64;
            return match whence {
                _ if offset < 0 || offset >= len => Err(Error::errno(libc::ENXIO)),
                libc::SEEK_DATA => Ok(offset),
                libc::SEEK_HOLE => Ok(len),
                _ => Err(Error::errno(libc::EINVAL)),
            };
        }
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(Error::errno(libc::EINVAL));
        }
        let guard = h.file.read().unwrap();
        let Some(file) = guard.as_ref() else {
            return Err(Error::errno(libc::EISDIR));
        };
        // SAFETY: plain lseek(2) on a descriptor this handle owns; reads and
        // writes use pread/pwrite, so its file position is not used.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if at < 0 {
            return Err(Error::errno(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            ));
        }
        Ok(at)
    }

    /// `mknod(S_IFREG)`: an empty regular file, made as `open(O_CREAT |
    /// O_EXCL)` and `close()` would make it (published at once in a shared
    /// class, like any file closed after creation).
    pub fn create_closed(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        caller: Caller,
    ) -> Result<Attr> {
        let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
        let (attr, fh) = self.create(parent, name, mode, flags, caller)?;
        self.release(fh)?;
        match self.store.inode(attr.ino)? {
            Some(inode) => Ok(self.attr_of(&inode)),
            None => Ok(attr),
        }
    }

    pub fn fsync(&self, fh: u64) -> Result<()> {
        let h = self.handle(fh)?;
        if let (Mode::Write, Some(f)) = (h.mode, h.file.read().unwrap().as_ref()) {
            f.sync_all().map_err(|e| Error::io(e, "fsync"))?;
        }
        Ok(())
    }
}
