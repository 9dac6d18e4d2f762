//! One metadata change: a RocksDB batch, the gauge deltas it implies, the
//! blob stripes it holds, and the work to do once it is committed.
//!
//! Invariants:
//! - A transaction adds or drops references only to blobs whose stripes it
//!   holds (`lock_blobs`, asserted), so a blob's last reference and a new
//!   reference to it are never decided concurrently: a blob is deleted
//!   exactly when its last reference goes, never while one is being added.
//! - Gauges change by deltas only (merged in the store, added in memory
//!   after the commit): nothing in a batch is read-modify-written.
//! - Files are removed only after the batch that stops pointing at them is
//!   committed, while the blob stripes are still held.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::fs::locks::BlobGuard;
use crate::fs::{Core, Invalidate, URGENT};
use crate::shared::tier::Upload;
use crate::stats::StoreGauges;
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{Batch, Content, Inode, Kind, PendingReason};

/// The store gauges in memory: read without a lock, changed after commits.
pub struct Gauges {
    blobs: AtomicU64,
    bytes_stored: AtomicU64,
    bytes_logical: AtomicU64,
}

impl Gauges {
    pub fn new(g: StoreGauges) -> Gauges {
        Gauges {
            blobs: g.blobs.into(),
            bytes_stored: g.bytes_stored.into(),
            bytes_logical: g.bytes_logical.into(),
        }
    }

    pub fn get(&self) -> StoreGauges {
        StoreGauges {
            blobs: self.blobs.load(Ordering::Relaxed),
            bytes_stored: self.bytes_stored.load(Ordering::Relaxed),
            bytes_logical: self.bytes_logical.load(Ordering::Relaxed),
        }
    }

    /// Invariant: a gauge never goes below zero (every decrement undoes an
    /// increment an earlier commit made); asserted, not clamped, so a
    /// miscount shows where it happens.
    fn add(&self, d: &Delta) {
        let apply = |a: &AtomicU64, d: i64, gauge: &str| {
            if d >= 0 {
                a.fetch_add(d as u64, Ordering::Relaxed);
            } else {
                let before = a.fetch_sub(d.unsigned_abs(), Ordering::Relaxed);
                assert!(
                    before >= d.unsigned_abs(),
                    "store gauge {gauge} would go below zero ({before} - {}): a blob or reference counted out twice (invariant)",
                    d.unsigned_abs()
                );
            }
        };
        apply(&self.blobs, d.blobs, "blobs");
        apply(&self.bytes_stored, d.bytes_stored, "bytes_stored");
        apply(&self.bytes_logical, d.bytes_logical, "bytes_logical");
    }
}

#[derive(Default)]
struct Delta {
    blobs: i64,
    bytes_stored: i64,
    bytes_logical: i64,
}

/// Work to do once a batch is committed.
pub enum After {
    RemoveBlob(BlobId),
    RemoveStaging(Ino),
    /// The staging file of a deleted inode: kept for reuse (see `Blobs`).
    RetireStaging(Ino),
    /// After the reply: for names, whose directory the kernel may hold
    /// locked until the request is answered.
    Invalidate(Invalidate),
    /// Before the reply (see `send_urgent_invalidations`).
    InvalidateNow(Invalidate),
    /// Share a publication (queued; never waits on the network).
    Upload(Upload),
    /// An evicted inode the kernel held is gone (see `Evicted`).
    Released(Ino),
}

/// One metadata change being assembled.
pub struct Txn<'a> {
    pub batch: Batch<'a>,
    delta: Delta,
    added_refs: Vec<(BlobId, Ino)>,
    removed_refs: Vec<(BlobId, Ino)>,
    pub new_blobs: Vec<BlobId>,
    pub after: Vec<After>,
    blobs_held: Option<BlobGuard<'a>>,
}

impl Core {
    pub(super) fn txn(&self) -> Txn<'_> {
        Txn {
            batch: self.store.batch(),
            delta: Delta::default(),
            added_refs: Vec::new(),
            removed_refs: Vec::new(),
            new_blobs: Vec::new(),
            after: Vec::new(),
            blobs_held: None,
        }
    }

    /// Takes the stripes of every blob this transaction will reference or
    /// release (lock order level 3; once per transaction).
    pub(super) fn lock_blobs<'a>(&'a self, txn: &mut Txn<'a>, ids: &[BlobId]) {
        assert!(
            txn.blobs_held.is_none(),
            "blob stripes are taken once per transaction"
        );
        txn.blobs_held = Some(self.blob_locks.lock(ids, &self.stats.lock_wait));
    }

    /// The blob (if any) an inode's content references, for `lock_blobs`.
    pub(super) fn blob_of(inode: &Inode) -> Option<BlobId> {
        match inode.content {
            Content::Blob(id) => Some(id),
            _ => None,
        }
    }

    pub(super) fn assert_held(txn: &Txn, id: &BlobId) {
        assert!(
            txn.blobs_held.as_ref().is_some_and(|g| g.covers(id)),
            "blob {id} changed without its stripe held"
        );
    }

    /// Commits a batch (callers hold the inode stripes it touches), then does
    /// what it implies. Not synced: callers acknowledging a publication call
    /// `sync_log` after releasing their locks.
    pub(super) fn commit(&self, mut txn: Txn) -> Result<()> {
        let d = &txn.delta;
        txn.batch
            .add_gauges(d.blobs, d.bytes_stored, d.bytes_logical);
        // Pending uploads are counted before their records can be seen (an
        // upload worker may read one back from the store at once).
        let uploads = txn
            .after
            .iter()
            .filter(|a| matches!(a, After::Upload(_)))
            .count() as u64;
        let tier = self.tier.get().filter(|_| uploads > 0);
        if let Some(t) = tier {
            t.count_pending(uploads);
        }
        if let Err(e) = txn.batch.commit(false) {
            if let Some(t) = tier {
                t.uncount_pending(uploads);
            }
            return Err(self.count_error(e));
        }
        self.gauges.add(&txn.delta);
        for a in txn.after {
            match a {
                After::RemoveBlob(id) => self.blobs.remove_blob(&id),
                After::RemoveStaging(ino) => self.blobs.remove_staging(ino),
                After::RetireStaging(ino) => self.blobs.retire_staging(ino),
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
                After::Released(ino) => self.release_evicted(ino),
            }
        }
        drop(txn.blobs_held);
        Ok(())
    }

    /// Records a new blob (its file is in place and durable).
    pub(super) fn add_blob(&self, txn: &mut Txn, id: BlobId, size: u64) {
        Self::assert_held(txn, &id);
        txn.batch.put_blob(&id, size);
        txn.new_blobs.push(id);
        txn.delta.blobs += 1;
        txn.delta.bytes_stored += size as i64;
    }

    pub(super) fn add_ref(&self, txn: &mut Txn, id: BlobId, ino: Ino, size: u64) {
        Self::assert_held(txn, &id);
        txn.batch.put_blob_ref(&id, ino);
        txn.added_refs.push((id, ino));
        txn.delta.bytes_logical += size as i64;
    }

    /// Drops `ino`'s reference to `id`, and the blob itself if that was the
    /// last one (its file is removed after the commit).
    pub(super) fn drop_ref(&self, txn: &mut Txn, id: BlobId, ino: Ino, size: u64) -> Result<()> {
        Self::assert_held(txn, &id);
        txn.batch.delete_blob_ref(&id, ino);
        txn.removed_refs.push((id, ino));
        txn.delta.bytes_logical -= size as i64;
        let others = self.store.blob_refs(&id, 8)?;
        let still_used = others.iter().any(|o| !txn.removed_refs.contains(&(id, *o)))
            || txn
                .added_refs
                .iter()
                .any(|(a, i)| *a == id && !txn.removed_refs.contains(&(id, *i)));
        if !still_used && !txn.new_blobs.contains(&id) {
            txn.batch.delete_blob(&id);
            txn.delta.blobs -= 1;
            txn.delta.bytes_stored -= size as i64;
            txn.after.push(After::RemoveBlob(id));
        }
        Ok(())
    }

    /// Removes an inode record and its content.
    pub(super) fn delete_inode(&self, txn: &mut Txn, inode: &Inode) -> Result<()> {
        txn.batch.delete_inode(inode.ino);
        txn.batch.delete_pending(inode.ino);
        self.note_deleted(txn, inode.ino);
        match &inode.content {
            Content::Blob(id) => self.drop_ref(txn, *id, inode.ino, inode.size)?,
            Content::Staged => txn.after.push(After::RetireStaging(inode.ino)),
            Content::None | Content::Symlink(_) | Content::Device(_) => {}
        }
        Ok(())
    }

    /// Removes one name of `inode` (callers hold the stripes of `parent` and
    /// of the inode, and the inode's blob); the inode goes when nothing uses it.
    pub(super) fn unbind(
        &self,
        txn: &mut Txn,
        parent: Ino,
        name: &[u8],
        mut inode: Inode,
    ) -> Result<()> {
        txn.batch.delete_dentry(parent, name);
        if inode.kind != Kind::Dir && inode.nlink > 1 {
            inode.drop_name(parent, name);
        }
        // A bound file has nlink >= 1, a directory >= 2 (its name and ".").
        inode.nlink = inode
            .nlink
            .checked_sub(if inode.kind == Kind::Dir { 2 } else { 1 })
            .expect("unbind of a name its inode does not count (nlink invariant)");
        if inode.nlink == 0 {
            if self.usage.in_use(inode.ino) {
                txn.batch.put_pending(inode.ino, PendingReason::Unbound);
                inode.ctime_ns = self.now();
                txn.batch.put_inode(&inode);
            } else {
                self.delete_inode(txn, &inode)?;
            }
        } else {
            inode.ctime_ns = self.now();
            txn.batch.put_inode(&inode);
        }
        Ok(())
    }

    /// Unbinds every name of a file (eviction, a damaged blob), queueing
    /// the kernel's invalidation of each.
    pub(super) fn unbind_all(&self, txn: &mut Txn, mut inode: Inode) -> Result<()> {
        for (parent, name) in std::mem::take(&mut inode.links) {
            txn.batch.delete_dentry(parent, &name);
            txn.after
                .push(After::Invalidate(Invalidate::Entry(parent, name)));
        }
        inode.nlink = inode.nlink.min(1);
        let (parent, name) = (inode.parent, inode.name.clone());
        txn.after
            .push(After::Invalidate(Invalidate::Entry(parent, name.clone())));
        self.unbind(txn, parent, &name, inode)
    }

    pub(super) fn touch_dir(&self, txn: &mut Txn, mut dir: Inode, now: u64) {
        dir.stamp(now);
        txn.batch.put_inode(&dir);
    }

    /// Deletes an unbound inode once neither a handle nor the kernel holds it.
    pub(super) fn maybe_forget(&self, ino: Ino) -> Result<()> {
        if ino.is_virtual() || ino == Ino::ROOT || self.usage.in_use(ino) {
            return Ok(());
        }
        let _g = self.lock(&[ino]);
        let Some(inode) = self.store.inode(ino)? else {
            return Ok(());
        };
        if inode.nlink > 0 || self.usage.in_use(ino) {
            return Ok(());
        }
        let mut txn = self.txn();
        if let Some(id) = Self::blob_of(&inode) {
            self.lock_blobs(&mut txn, &[id]);
        }
        self.delete_inode(&mut txn, &inode)?;
        self.commit(txn)
    }
}
