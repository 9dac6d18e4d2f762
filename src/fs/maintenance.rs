//! Keeping the store healthy: recovery at start, free-space checks, the
//! background scrub, dropping corrupt blobs, and eviction under a size limit.
//!
//! Invariants:
//! - A blob is treated as damaged only after re-checking under its stripe
//!   that it is still recorded and still missing or still failing its hash;
//!   a blob whose last name just went is not damage.
//! - Dropping a damaged blob moves its file to `quarantine/` first and then
//!   unbinds only the names that referenced it at that moment, so a new
//!   publication of the same bytes (which links a good file again) keeps
//!   its name.
//! - Eviction never takes an open file or one used since it was chosen.

use std::sync::atomic::{AtomicU64, Ordering};

use log::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fs::{Caller, Core, SetAttr, Statfs, DIR_ENTRIES_MAX, EVICT_BATCH_MAX};
use crate::stats::Stats;
use crate::store::blobs::Blobs;
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{Content, Inode, Kind, PendingReason};

/// Free space kept back on the store's filesystem, as a fraction (1/N) of
/// its size, clamped to the bounds below: writers get ENOSPC before the
/// metadata database could run out of room for its own log and flushes.
const SPACE_RESERVE_DIVISOR: u64 = 100;
const SPACE_RESERVE_BYTES_MIN: u64 = 8 << 20;
const SPACE_RESERVE_BYTES_MAX: u64 = 128 << 20;
/// The last free-space answer and the last "disk full" warning.
#[derive(Default)]
pub(super) struct SpaceCheck {
    /// Bytes that may still be written before `statvfs` is asked again:
    /// half the room above the reserve at the last check (a "full" answer
    /// leaves none). Writers take from it, so no burst of writes can run
    /// past the reserve between two checks.
    budget_bytes: std::sync::atomic::AtomicI64,
    /// Wall second of the last "disk full" warning, to log it once a minute.
    full_warned_s: AtomicU64,
}

impl Core {
    /// Refuses `len` new bytes when the store's filesystem is down to its
    /// reserve.
    pub(super) fn check_space(&self, len: u64) -> Result<()> {
        let len = len.min(i64::MAX as u64) as i64;
        if self.space.budget_bytes.fetch_sub(len, Ordering::Relaxed) >= len {
            return Ok(());
        }
        let s = self.statfs()?;
        let total = s.blocks * s.bsize as u64;
        let free = s.bavail * s.bsize as u64;
        let reserve =
            (total / SPACE_RESERVE_DIVISOR).clamp(SPACE_RESERVE_BYTES_MIN, SPACE_RESERVE_BYTES_MAX);
        if free >= reserve {
            let budget = ((free - reserve) / 2).min(i64::MAX as u64) as i64;
            self.space.budget_bytes.store(budget, Ordering::Relaxed);
            return Ok(());
        }
        self.space.budget_bytes.store(0, Ordering::Relaxed);
        Stats::bump(&self.stats.counters.errors);
        let now_s = crate::store::clock::wall_ns() / 1_000_000_000;
        if now_s >= self.space.full_warned_s.load(Ordering::Relaxed) + 60 {
            self.space.full_warned_s.store(now_s, Ordering::Relaxed);
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

    pub(super) fn ensure_root(&self) -> Result<()> {
        if self.store.inode(Ino::ROOT)?.is_some() {
            return Ok(());
        }
        let mut txn = self.txn();
        let now = self.now();
        let root = Inode {
            ino: Ino::ROOT,
            kind: Kind::Dir,
            class: crate::classes::Class::Local,
            perm: 0o755,
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            nlink: 2,
            size: 0,
            mtime_ns: now,
            atime_ns: None,
            ctime_ns: now,
            mtime_set: false,
            parent: Ino::ROOT,
            name: Vec::new(),
            links: Vec::new(),
            content: Content::None,
        };
        txn.batch.put_inode(&root);
        self.commit(txn)?;
        self.store.sync_log()
    }

    pub(super) fn apply_root_settings(&self) -> Result<()> {
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

    /// Crash recovery (at start, alone): inodes that were never bound, or
    /// bound while still being written, are dropped; staging files nobody
    /// owns are removed.
    pub(super) fn recover(&self) -> Result<()> {
        let pending = self.store.pending()?;
        let mut inodes = Vec::new();
        for (ino, reason) in &pending {
            if let Some(inode) = self.store.inode(*ino)? {
                inodes.push((inode, *reason));
            }
        }
        let mut txn = self.txn();
        let ids: Vec<BlobId> = inodes
            .iter()
            .filter_map(|(i, _)| Self::blob_of(i))
            .collect();
        self.lock_blobs(&mut txn, &ids);
        for (ino, _) in &pending {
            txn.batch.delete_pending(*ino);
        }
        for (inode, reason) in &inodes {
            if *reason == PendingReason::Unsealed {
                for (parent, name) in inode.names() {
                    if self.store.dentry(parent, &name)? == Some(inode.ino) {
                        txn.batch.delete_dentry(parent, &name);
                    }
                }
            }
            self.delete_inode(&mut txn, inode)?;
        }
        if !pending.is_empty() {
            info!(
                "recovery: dropped {} unpublished or unfinished files",
                pending.len()
            );
        }
        self.commit(txn)?;
        self.store.sync_log()?;
        self.count_dir_links()?;
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

    /// A blob found missing or failing its hash: if that is still so under
    /// its stripe, it is quarantined and every name pointing at it then is
    /// dropped, so the next lookup is a miss and the cache refills it.
    pub(super) fn drop_corrupt(&self, id: BlobId) -> Result<()> {
        let victims = {
            let mut txn = self.txn();
            self.lock_blobs(&mut txn, &[id]);
            if !self.store.blob_known(&id)? {
                return Ok(()); // its last name went meanwhile: not damage
            }
            let damaged = match self.blobs.open_blob(&id) {
                Ok(f) => !Blobs::verify(&f, &id)?,
                // Found and dropped before; open handles still hold it.
                Err(_) if self.blobs.is_quarantined(&id) => return Ok(()),
                Err(_) => true,
            };
            if !damaged {
                return Ok(()); // re-linked by a new publication meanwhile
            }
            Stats::bump(&self.stats.counters.corrupt_blobs);
            self.verified.with(&id, |m| m.remove(&id));
            self.blobs.quarantine(&id);
            self.store.blob_refs(&id, DIR_ENTRIES_MAX)?
        };
        for ino in victims {
            if let Err(e) = self.unbind_damaged(ino, id) {
                warn!("drop names of corrupt blob {id} ino={ino}: {e}");
            }
        }
        Ok(())
    }

    /// Stores before directory link counts kept every directory at 2: count
    /// each directory's subdirectories once (at start, alone).
    fn count_dir_links(&self) -> Result<()> {
        const KEY: &str = "dir_link_counts";
        if self.store.converted(KEY)? {
            return Ok(());
        }
        let mut subdirs: std::collections::HashMap<Ino, u32> = Default::default();
        let mut dirs = Vec::new();
        self.store.for_each_inode(|r| match r {
            Ok(i) if i.kind == Kind::Dir => {
                if i.ino != Ino::ROOT {
                    *subdirs.entry(i.parent).or_default() += 1;
                }
                dirs.push(i);
            }
            Ok(_) => {}
            // `casfs fsck` reports and repairs it; a count may be one short.
            Err(e) => warn!("counting directory links: {e}"),
        })?;
        let mut txn = self.txn();
        for mut dir in dirs {
            let nlink = 2 + subdirs.get(&dir.ino).copied().unwrap_or(0);
            if dir.nlink != nlink {
                dir.nlink = nlink;
                txn.batch.put_inode(&dir);
            }
        }
        self.commit(txn)?;
        self.store.sync_log()?;
        self.store.mark_converted(KEY)
    }

    /// The inodes to lock to unbind every name of `inode`: the directories
    /// of its names, and itself.
    fn name_locks(inode: &Inode) -> Vec<Ino> {
        let mut inos: Vec<Ino> = inode.names().into_iter().map(|(p, _)| p).collect();
        inos.push(inode.ino);
        inos
    }

    /// Unbinds the names of `ino` if it still points at the damaged blob `id`.
    fn unbind_damaged(&self, ino: Ino, id: BlobId) -> Result<()> {
        let Some(peek) = self.store.inode(ino)? else {
            return Ok(());
        };
        let _g = self.lock(&Self::name_locks(&peek));
        let Some(inode) = self.store.inode(ino)? else {
            return Ok(());
        };
        let (parent, name) = (inode.parent, inode.name.clone());
        if inode.content != Content::Blob(id)
            || inode.nlink == 0
            || inode.names() != peek.names()
            || self.store.dentry(parent, &name)? != Some(ino)
        {
            return Ok(());
        }
        let mut txn = self.txn();
        self.lock_blobs(&mut txn, &[id]);
        self.unbind_all(&mut txn, inode)?;
        self.commit(txn)
    }

    /// Checks one blob, picked at random, against its hash; a damaged one
    /// is quarantined and its names dropped, as on open.
    pub fn scrub_one(&self) -> Result<()> {
        let seed = crate::store::clock::wall_ns().to_le_bytes();
        let from = *blake3::hash(&seed).as_bytes();
        let Some(id) = self.store.blob_at_or_after(&from)? else {
            return Ok(());
        };
        let Ok(file) = self.blobs.open_blob(&id) else {
            debug!("scrub: blob {id} is missing; checking under its lock");
            return self.drop_corrupt(id);
        };
        Stats::bump(&self.stats.counters.blobs_scrubbed);
        if !Blobs::verify(&file, &id)? {
            warn!(
                "scrub: corrupt blob={id}: bytes do not match the hash; quarantined, names dropped"
            );
            self.drop_corrupt(id)?;
        }
        Ok(())
    }

    /// Bytes of blobs in the store now.
    pub fn bytes_stored(&self) -> u64 {
        self.gauges.get().bytes_stored
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
            // The oldest EVICT_BATCH_MAX candidates, by a scan without locks.
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
        let Some(peek) = self.store.inode(ino)? else {
            return Ok(false);
        };
        let _g = self.lock(&Self::name_locks(&peek));
        let Some(inode) = self.store.inode(ino)? else {
            return Ok(false);
        };
        // Used since the scan, open, moved, or no longer a published name: keep.
        let Some(id) = Self::blob_of(&inode) else {
            return Ok(false);
        };
        if inode.mtime_ns != seen_mtime_ns
            || inode.nlink == 0
            || inode.names() != peek.names()
            || self.usage.has_handles(ino)
        {
            return Ok(false);
        }
        let (parent, name, size) = (inode.parent, inode.name.clone(), inode.size);
        if self.store.dentry(parent, &name)? != Some(ino) {
            return Ok(false);
        }
        for (p, n) in inode.names() {
            self.remember_floor(p, &n, inode.mtime_ns);
        }
        let mut txn = self.txn();
        self.lock_blobs(&mut txn, &[id]);
        self.unbind_all(&mut txn, inode)?;
        self.commit(txn)?;
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
    /// a mount makes.
    pub fn populate(&self, entries: u64) -> Result<()> {
        let me = Caller { uid: 0, gid: 0 };
        let dir = |parent: Ino, name: &[u8]| -> Result<Ino> {
            match self.store.dentry(parent, name)? {
                Some(i) => Ok(i),
                None => Ok(self.mkdir(parent, name, 0o755, me)?.ino),
            }
        };
        let cc = dir(Ino::ROOT, b"cc")?;
        let hex = b"0123456789abcdef";
        let mut dirs = Vec::new();
        for a in hex {
            let da = dir(cc, &[*a])?;
            for b in hex {
                dirs.push(dir(da, &[*b])?);
            }
        }
        for i in 0..entries {
            let dir = dirs[(i % 256) as usize];
            let (_, fh) = self.create(dir, b"p.tmp", 0o644, libc::O_EXCL, me)?;
            self.write(fh, 0, format!("casfs scale entry {i}\n").as_bytes())?;
            self.flush(fh)?;
            self.release(fh)?;
            let name = format!("{i:030}R");
            self.rename(dir, b"p.tmp", dir, name.as_bytes(), 0)?;
            let ino = self
                .store
                .dentry(dir, name.as_bytes())?
                .expect("just published");
            self.forget(ino, 1);
        }
        Ok(())
    }
}
