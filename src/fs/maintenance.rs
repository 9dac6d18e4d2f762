//! Keeping the store healthy: recovery at start, free-space checks, the
//! background scrub, the sweep of orphan blob files after mount, dropping
//! corrupt blobs, and eviction under a size limit.
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
//! - Eviction stops at its target: what it evicted and only the kernel
//!   still holds counts as gone (`Evicted`), and publications wait for a
//!   running pass (`keep_under_limit`), so they cannot outrun it.
//! - The orphan sweep removes a blob file only if no record names it and
//!   it was linked before this daemon started, decided under the blob's
//!   stripe (`sweep_orphan_blobs` has the whole rule).
//! - New names and new bytes are refused (ENOSPC) while the store's
//!   filesystem is down to its reserve, whoever filled it (`check_space`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use log::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fs::locks::Sharded;
use crate::fs::txn::{After, Txn};
use crate::fs::{Caller, Core, SetAttr, Statfs, DIR_ENTRIES_MAX, EVICT_BATCH_MAX, TOUCH_BATCH_MAX};
use crate::stats::Stats;
use crate::store::blobs::Blobs;
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{Content, FileTime, Inode, Kind, PendingReason};
use crate::store::space;

/// An eviction pass brings the store down to this share of `--max-size`,
/// so that passes are not triggered by every publication.
pub const EVICT_TARGET_PERCENT: u64 = 90;

/// `--max-size` and the target an eviction pass brings the store down to.
#[derive(Clone, Copy, Debug)]
pub(super) struct SizeLimit {
    max_bytes: u64,
    target_bytes: u64,
}

/// Evicted inodes the kernel still holds: eviction removes every name of
/// a file at once, but the inode, and the blob it references, live until
/// the kernel forgets it (a FORGET some time after the invalidation).
/// Their bytes are still stored, yet evicting more would not bring them
/// back sooner, so eviction counts the store without them
/// (`Core::bytes_live`); without that, a pass evicted far below its
/// target whenever the kernel was slower than the pass.
///
/// Invariants: an inode is here only while its record exists, with no
/// name, as the only reference of its blob when it was evicted (a blob
/// shared with another name is not counted); `bytes` is the sum of the
/// sizes here. Entries go when the inode's deletion commits
/// (`note_deleted`), so the table is bounded by what the kernel holds.
#[derive(Default)]
pub(super) struct Evicted {
    held: Sharded<Ino, u64>,
    bytes: AtomicU64,
}

/// At most this long between two asks of `statvfs` while writes have
/// budget left: the budget counts only casfs's own writes, so a disk that
/// another process fills is noticed within this time.
const SPACE_CHECK_INTERVAL_MS: u64 = 100;

/// The last free-space answer, and whether the store is in a "full"
/// episode (logged once when it starts and once when it ends).
#[derive(Default)]
pub(super) struct SpaceCheck {
    /// Bytes that may still be written before `statvfs` is asked again:
    /// half the room above the reserve at the last check (a "full" answer
    /// leaves none). Writers take from it, so no burst of writes can run
    /// past the reserve between two checks.
    budget_bytes: std::sync::atomic::AtomicI64,
    /// Wall ms of the last `statvfs`.
    checked_ms: AtomicU64,
    full: AtomicBool,
}

impl Core {
    /// Refuses `len` new bytes (`len == 0`: a new name) with ENOSPC when
    /// the store's filesystem is down to its reserve, before the metadata
    /// database's log could hit a full disk, whoever filled it: casfs's own
    /// writes use up the budget; a disk another process fills is seen by
    /// the next `statvfs` (every new name asks, and data writes ask at
    /// least every `SPACE_CHECK_INTERVAL_MS`) although the budget says
    /// there is room.
    pub(super) fn check_space(&self, len: u64) -> Result<()> {
        let len = len.min(i64::MAX as u64) as i64;
        let now_ms = crate::store::clock::wall_ns() / 1_000_000;
        let fresh =
            now_ms < self.space.checked_ms.load(Ordering::Relaxed) + SPACE_CHECK_INTERVAL_MS;
        if len > 0 && fresh && self.space.budget_bytes.fetch_sub(len, Ordering::Relaxed) >= len {
            return Ok(());
        }
        let room = space::room(&self.store.root)?;
        self.space.checked_ms.store(now_ms, Ordering::Relaxed);
        if room.above_reserve() {
            let budget = (room.spare_bytes() / 2).min(i64::MAX as u64) as i64;
            self.space.budget_bytes.store(budget, Ordering::Relaxed);
            if self.space.full.swap(false, Ordering::Relaxed) {
                info!(
                    "store {} has room again ({} bytes free): writes accepted",
                    self.store.root.display(),
                    room.free_bytes
                );
            }
            return Ok(());
        }
        let budget_left = self.space.budget_bytes.swap(0, Ordering::Relaxed);
        Stats::bump(&self.stats.counters.errors);
        if !self.space.full.swap(true, Ordering::Relaxed) {
            let who = if budget_left > len {
                "filled by another process (casfs's own writes had left it room)"
            } else {
                "full"
            };
            warn!(
                "store {} is {who}: {} bytes free, {} kept in reserve for the metadata; \
                 new files and writes get ENOSPC, reads go on, until space is freed",
                self.store.root.display(),
                room.free_bytes,
                room.reserve_bytes
            );
        }
        Err(Error::errno(libc::ENOSPC))
    }

    pub fn statfs(&self) -> Result<Statfs> {
        let r = space::room(&self.store.root)?;
        Ok(Statfs {
            blocks: r.blocks,
            bfree: r.bfree,
            bavail: r.bavail,
            files: r.files,
            ffree: r.ffree,
            bsize: r.bsize,
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
            self.forget_verified(&id);
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

    /// Removes blob files that no metadata record names, in the background
    /// after mount: a `kill -9` between a publication's link of its blob
    /// file and its commit leaves one (fsck calls them crash leftovers).
    /// Shard by shard, each shard's sorted listing merged with the blob ids
    /// on record for it, so the cost is one pass over `blobs/` and the
    /// `blobs` column family. Returns the files and bytes removed.
    ///
    /// The rule that keeps a live publication's file (a publication links
    /// its blob file in `prepare`, with no lock, and records it later under
    /// the blob's stripe):
    /// 1. Only a file linked before this daemon started is a candidate: its
    ///    ctime is older than `Store::opened_at` (both on the store
    ///    filesystem's clock; every file this daemon links gets a ctime at
    ///    or after it, from the `link()` and the `chmod` that follows). So
    ///    no publication of this daemon is ever a candidate.
    /// 2. The file is removed under the blob's stripe, after checking again
    ///    there that no record names the blob and that the file is still
    ///    that old one: a commit that records the blob holds the same
    ///    stripe, so the sweep never removes a file a committed record
    ///    names.
    /// 3. Should both fail (a wall clock stepped back across the mount), a
    ///    publication that finds its file gone at its commit links it
    ///    again, under the stripe, before it records it (`settle_blob_file`).
    ///
    /// A publication of the same bytes as an old orphan dedups onto its
    /// file (checking it first) and so adopts it, if it gets there first.
    pub fn sweep_orphan_blobs(&self) -> Result<(u64, u64)> {
        self.sweep_orphan_blobs_before(self.store.opened_at())
    }

    /// `sweep_orphan_blobs` with the cutoff of rule 1 given (tests).
    pub(super) fn sweep_orphan_blobs_before(&self, cutoff: FileTime) -> Result<(u64, u64)> {
        let (mut files, mut bytes) = (0u64, 0u64);
        let old = |path: &std::path::Path| {
            std::fs::symlink_metadata(path)
                .ok()
                .filter(|m| m.is_file() && FileTime::ctime_of(m) < cutoff)
        };
        for shard in 0..=255u8 {
            let on_disk = match self.blobs.shard_files(shard) {
                Ok(f) => f,
                Err(e) => {
                    warn!("orphan sweep: cannot list blobs/{shard:02x}: {e}");
                    continue;
                }
            };
            let recorded = self.store.blob_ids_in_shard(shard)?;
            let mut r = recorded.iter().peekable();
            for (id, path) in on_disk {
                while r.next_if(|k| **k < id).is_some() {}
                if r.peek() == Some(&&id) || old(&path).is_none() {
                    continue;
                }
                let _g = self.blob_locks.lock(&[id], &self.stats.lock_wait);
                if self.store.blob_known(&id)? {
                    continue; // published meanwhile: adopted
                }
                let Some(m) = old(&path) else {
                    continue;
                };
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        self.forget_verified(&id);
                        files += 1;
                        bytes += m.len();
                        Stats::bump(&self.stats.counters.orphan_blobs_removed);
                        debug!("orphan sweep: removed blob={id} size={}", m.len());
                    }
                    Err(e) => warn!(
                        "orphan sweep: cannot remove blob file {}: {e}",
                        path.display()
                    ),
                }
            }
        }
        Stats::bump(&self.stats.counters.orphan_sweeps);
        Ok((files, bytes))
    }

    /// Bytes of blobs in the store now.
    pub fn bytes_stored(&self) -> u64 {
        self.gauges.get().bytes_stored
    }

    /// Bytes of blobs whose names eviction removed but that the kernel
    /// still holds by inode (they go when it forgets them, see `Evicted`).
    pub fn bytes_evicted_held(&self) -> u64 {
        self.evicted.bytes.load(Ordering::Relaxed)
    }

    /// Bytes stored that eviction can still act on: the store less what it
    /// already evicted and only waits for the kernel to let go of. The two
    /// gauges are read one after the other, not together, so the
    /// difference saturates (an eviction's blob may be counted in both for
    /// a moment after its inode went).
    pub fn bytes_live(&self) -> u64 {
        self.bytes_stored()
            .saturating_sub(self.bytes_evicted_held())
    }

    /// Sets `--max-size` (once, at mount): `keep_under_limit` evicts down
    /// to `EVICT_TARGET_PERCENT` of it once the store goes over it.
    pub fn set_size_limit(&self, max_bytes: u64) {
        let limit = SizeLimit {
            max_bytes,
            target_bytes: max_bytes / 100 * EVICT_TARGET_PERCENT,
        };
        if self.size_limit.set(limit).is_err() {
            warn!("size limit set twice; keeping the first");
        }
    }

    /// Once the store is over its size limit, evicts down to the limit's
    /// target. Publications call it before they are answered (with no lock
    /// held), and so does the evictor thread: one pass runs at a time
    /// (`evict_pass`), and a caller that finds one running waits for it and
    /// checks again, so a stream of publications cannot outrun eviction
    /// and the store never holds more than the limit plus what is being
    /// published. Returns the number of names evicted.
    pub fn keep_under_limit(&self) -> u64 {
        let Some(limit) = self.size_limit.get() else {
            return 0;
        };
        if self.bytes_live() <= limit.max_bytes {
            return 0;
        }
        let _pass = self.evict_pass.lock().unwrap();
        if self.bytes_live() <= limit.max_bytes {
            return 0; // the pass we waited for did it
        }
        match self.evict(limit.target_bytes) {
            Ok(n) => {
                info!(
                    "evicted {n} entries; store now {} bytes ({} more held by the kernel until it forgets evicted files), limit {}",
                    self.bytes_live(),
                    self.bytes_evicted_held(),
                    limit.max_bytes
                );
                n
            }
            Err(e) => {
                warn!("eviction failed: {e}");
                0
            }
        }
    }

    /// Writes the touches not yet written (`store/touches.rs`), up to
    /// `TOUCH_BATCH_MAX` inodes per commit, each under its stripe. Returns
    /// how many records were written; on an error what is left stays
    /// pending for the next call.
    pub fn write_touches(&self) -> Result<usize> {
        let mut written = 0;
        for chunk in self.store.touches.pending().chunks(TOUCH_BATCH_MAX) {
            let _g = self.lock(chunk);
            let mut txn = self.txn();
            for &ino in chunk {
                match self.store.inode(ino)? {
                    Some(inode) => {
                        txn.batch.put_inode(&inode);
                        written += 1;
                    }
                    None => self.store.touches.landed(ino),
                }
            }
            self.commit(txn)?;
        }
        Ok(written)
    }

    /// Evicts least recently used names (oldest mtime first: a hit's touch
    /// counts as use) of published blobs until the store holds at most
    /// `target_bytes` besides what is evicted already and only held by the
    /// kernel (`bytes_live`). Files being written are not candidates (they
    /// are not blobs yet) and neither are open ones; an evicted name's blob
    /// goes with its last reference, and the kernel is told the name is
    /// gone. Returns the number of names evicted.
    pub fn evict(&self, target_bytes: u64) -> Result<u64> {
        let mut evicted = 0;
        while self.bytes_live() > target_bytes {
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
                if self.bytes_live() <= target_bytes {
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

    /// Called for every inode deletion being committed: an evicted inode
    /// the kernel held stops counting as held once the deletion commits.
    pub(super) fn note_deleted(&self, txn: &mut Txn, ino: Ino) {
        if self.evicted.held.with(&ino, |m| m.contains_key(&ino)) {
            txn.after.push(After::Released(ino));
        }
    }

    /// After the commit of an evicted inode's deletion (`After::Released`).
    pub(super) fn release_evicted(&self, ino: Ino) {
        if let Some(size) = self.evicted.held.with(&ino, |m| m.remove(&ino)) {
            self.evicted
                .bytes
                .fetch_sub(size, Ordering::Relaxed)
                .checked_sub(size)
                .expect("evicted-held bytes are the sum of the held sizes (invariant)");
        }
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
        // Still here: the kernel holds it (an inode lives while the kernel
        // does), and its blob with it. We hold its stripe, so it cannot go
        // before it is counted; if it is the blob's only reference, the
        // blob goes with it, so eviction must not count it as live.
        if self.store.inode(ino)?.is_some() && self.store.blob_refs(&id, 2)? == [ino] {
            let new = self
                .evicted
                .held
                .with(&ino, |m| m.insert(ino, size).is_none());
            assert!(
                new,
                "an inode is evicted at most once (it has no name after)"
            );
            self.evicted.bytes.fetch_add(size, Ordering::Relaxed);
        }
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
