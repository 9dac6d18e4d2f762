//! Publication: staged bytes become an immutable blob and a name is bound
//! to it; and the way back (copy-up) for classes whose files may change.
//!
//! A publication runs in two steps:
//! 1. `prepare`, with no lock held: hash the staged file (or a snapshot of
//!    it, if a writer still holds it), make it durable and link it into
//!    `blobs/` create-only (skipped when the blob is already known). When a
//!    blob file is already there (dedup), check it (`check_existing`): hashed
//!    unless the verified set vouches for it.
//! 2. Under the inode stripes and the blob's stripe: re-check what was read
//!    before, record the blob (`adopt_prepared`, which re-links the file in
//!    the rare case it was removed or quarantined meanwhile, and replaces it
//!    with the publication's bytes if it is damaged: `settle_blob_file`),
//!    point the inode at it, bind the name, commit. The log is synced after
//!    the locks are released and before the caller is answered.
//!
//! Invariants:
//! - While a publication prepares a staged file, `usage` admits no writer
//!   to it (`begin_seal`), so the bytes hashed are the bytes published.
//! - A blob file is durable and complete before any record points at it.
//! - A publication never binds a name to a blob file it has not checked:
//!   its own (just hashed), one the verified set vouches for unchanged, or
//!   one it hashed; a damaged one is replaced by its own bytes first.
//! - Create-only: a file created under a result name that is already bound
//!   to a published result becomes an unnamed alias of the winner.
//! - Create-only keeps the first *valid* content: `corrupt_result_at` tells,
//!   without any lock, whether a result fails its own format's checksum
//!   (`integrity`) so a valid newcomer's rename may replace it.

use std::fs::File;
use std::path::PathBuf;

use log::{debug, warn};

use crate::classes::Class;
use crate::error::{Error, Result};
use crate::fs::txn::{After, Txn};
use crate::fs::verified::Existing;
use crate::fs::{Core, Invalidate, RETRIES_MAX};
use crate::integrity::{self, Verdict};
use crate::stats::Stats;
use crate::store::blobs::Blobs;
use crate::store::ids::{BlobId, Ino};

/// When a publication is offered to the shared tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// In the publication's own transaction.
    Now,
    /// When the publishing handle is released: it may still write (a
    /// duplicated descriptor), and a create-only record cannot be taken back.
    AtRelease,
}
use crate::store::meta::{Content, Inode, Kind, PendingReason};

/// A test's code to run between a publication's link and its commit.
#[cfg(test)]
pub(super) type PrepareHook = Box<dyn Fn(&Core, &BlobId)>;

#[cfg(test)]
thread_local! {
    /// Called at the end of `prepare`, on the publishing thread (tests: what
    /// may happen between a publication's link and its commit).
    pub(super) static AFTER_PREPARE: std::cell::RefCell<Option<PrepareHook>> =
        const { std::cell::RefCell::new(None) };
}

/// A staged file's bytes, hashed, durable and (unless already known) linked
/// into place as a blob file, not yet recorded in the metadata.
pub(super) struct Prepared {
    pub id: BlobId,
    pub size: u64,
    pub head: [u8; 4],
    /// The file the blob was linked from (kept until the commit, to link
    /// again if the blob file disappears meanwhile).
    path: PathBuf,
    file: File,
    /// `path` is a snapshot copy, removed when this is dropped.
    snapshot: bool,
    /// This preparation linked a new blob file (no record pointed at it).
    linked_new: bool,
    /// What the check of a blob file already in place found (dedup).
    existing: Existing,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.snapshot {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Core {
    /// Step 1 of a publication (no lock held). `copy`: publish a snapshot,
    /// because a writer still holds the staging file or it keeps its name.
    pub(super) fn prepare(&self, ino: Ino, copy: bool) -> Result<Prepared> {
        let staging = self.blobs.staging_path(ino);
        let file = self.blobs.open_staging(ino, false)?;
        let (file, path) = if copy {
            let n = self
                .open_counter
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let snap_path = self.blobs.staging_dir().join(format!("snapshot-{ino}-{n}"));
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
        let mut p = Prepared {
            id: BlobId([0; 32]),
            size: 0,
            head: [0; 4],
            path,
            file,
            snapshot: copy,
            linked_new: false,
            existing: Existing::Absent,
        };
        let hashed = Blobs::hash_file(&p.file)?;
        p.id = hashed.id;
        p.size = hashed.size;
        p.head[..hashed.head_len].copy_from_slice(&hashed.head[..hashed.head_len]);
        if !self.store.blob_known(&p.id)? {
            // `install` finds the file already there after a crash between
            // linking and committing, or from a concurrent publication of
            // the same bytes: its bytes were hashed and synced before the
            // link, so recording it is enough.
            p.linked_new = self.blobs.install(&p.path, &p.file, &p.id)?;
        }
        if !p.linked_new {
            // Dedup: the file already there is checked before any name is
            // bound to it (a read of it, unless the verified set vouches for
            // it unchanged).
            p.existing = self.check_existing(&p.id)?;
        }
        #[cfg(test)]
        AFTER_PREPARE.with(|h| {
            if let Some(hook) = &*h.borrow() {
                hook(self, &p.id);
            }
        });
        Ok(p)
    }

    /// Records a prepared blob in `txn` (its stripe held): a new blob is
    /// added; a known one is reused (dedup). Either way its file is in place.
    pub(super) fn adopt_prepared(&self, txn: &mut Txn, p: &Prepared) -> Result<()> {
        let known = self.store.blob_known(&p.id)? || txn.new_blobs.contains(&p.id);
        // Linked again if it was removed (its last name went) or quarantined
        // since `prepare`, replaced if it is damaged; two stats otherwise.
        let durable = self.blobs.durable();
        self.settle_blob_file(txn, &p.id, &p.path, &p.file, durable, p.existing)?;
        if known {
            Stats::bump(&self.stats.counters.blobs_deduplicated);
        } else {
            self.add_blob(txn, p.id, p.size);
        }
        Stats::bump(&self.stats.counters.publications);
        Ok(())
    }

    /// A prepared blob that will not be published (its name lost a
    /// create-only race): its file goes if nothing records it. If other
    /// names use a blob file of these bytes and `prepare` found it damaged,
    /// it is replaced by these bytes all the same (the caller holds the
    /// blob's stripe).
    pub(super) fn discard_prepared(&self, txn: &mut Txn, p: &Prepared) -> Result<()> {
        let known = self.store.blob_known(&p.id)? || txn.new_blobs.contains(&p.id);
        if p.linked_new && !known {
            txn.after.push(After::RemoveBlob(p.id));
        }
        if known && matches!(p.existing, Existing::Damaged(_) | Existing::Changing) {
            let durable = self.blobs.durable();
            self.settle_blob_file(txn, &p.id, &p.path, &p.file, durable, p.existing)?;
        }
        Ok(())
    }

    /// Points a staged inode at its prepared blob inside `txn` (stripes of
    /// the inode and the blob held). The caller binds the name and commits.
    pub(super) fn seal_into(
        &self,
        txn: &mut Txn,
        inode: &mut Inode,
        p: &Prepared,
        class: Class,
    ) -> Result<()> {
        debug_assert_eq!(inode.content, Content::Staged);
        self.adopt_prepared(txn, p)?;
        self.add_ref(txn, p.id, inode.ino, p.size);
        txn.after.push(After::RemoveStaging(inode.ino));
        txn.batch.delete_pending(inode.ino);
        inode.content = Content::Blob(p.id);
        inode.size = p.size;
        inode.class = class.resolve(&p.head);
        // The clock's now, unless a client set the mtime after the last
        // write (`cp -a`, `touch -t` while it is open): that time is
        // stored as given (promise 5).
        let now = self.now();
        if inode.mtime_set && !self.usage.written(inode.ino) {
            inode.ctime_ns = now;
        } else {
            inode.stamp(now);
        }
        debug!(
            "publish ino={} blob={} size={} class={}",
            inode.ino, p.id, p.size, inode.class
        );
        Ok(())
    }

    /// Turns an inode that lost a create-only race into an unnamed alias of
    /// the winner's content, so a reader still holding it sees the winner's
    /// bytes; it is deleted once the kernel forgets it. Stripes of both
    /// blobs are held by the caller.
    pub(super) fn become_alias(
        &self,
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
        if self.usage.in_use(loser.ino) {
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
            loser.mtime_set = winner.mtime_set;
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

    /// Copies a blob-backed inode back into a staging file so it can be
    /// changed (mutable and local classes only), truncated to `len`. The
    /// caller holds the inode's and the blob's stripes.
    pub(super) fn copy_up(&self, txn: &mut Txn, inode: &mut Inode, len: Option<u64>) -> Result<()> {
        let Content::Blob(id) = inode.content else {
            return Ok(());
        };
        let staged = self.blobs.create_staging(inode.ino)?;
        // The size first: one the store's filesystem refuses (EFBIG) fails
        // before a byte is copied. A failure leaves no staged copy behind.
        let filled = (|| {
            if let Some(l) = len {
                staged.set_len(l).map_err(|e| match e.raw_os_error() {
                    Some(code @ (libc::EFBIG | libc::EINVAL)) => Error::errno(code),
                    _ => Error::io(e, "truncate"),
                })?;
            }
            // A copy of damaged bytes would be published as the writer's
            // own: the blob is checked as it is copied (its whole file is
            // read even for a shorter copy). The damage itself is handled
            // by the next open of it, which hashes it again.
            if len != Some(0) {
                let src = self.blobs.open_blob(&id)?;
                if !Blobs::copy_blob_checked(&src, &staged, len, &id)? {
                    self.forget_verified(&id);
                    warn!(
                        "corrupt blob={id} ino={}: its bytes do not match the hash; not copied for writing",
                        inode.ino
                    );
                    return Err(Error::with_context(
                        libc::EIO,
                        format!("blob {id} is damaged (its bytes do not match its hash)"),
                    ));
                }
            }
            Ok(())
        })();
        if let Err(e) = filled {
            drop(staged);
            self.blobs.remove_staging(inode.ino);
            return Err(e);
        }
        self.drop_ref(txn, id, inode.ino, inode.size)?;
        inode.content = Content::Staged;
        inode.size = staged
            .metadata()
            .map(|m| std::os::unix::fs::MetadataExt::size(&m))
            .unwrap_or(0);
        if inode.class.is_blob() && inode.nlink > 0 {
            txn.batch.put_pending(inode.ino, PendingReason::Unsealed);
        }
        Ok(())
    }

    /// The blob of the published result bound at `name` in `parent` if its
    /// bytes fail their own format's checksum while the newcomer's (`src`,
    /// or its prepared blob) pass it: create-only keeps the first *valid*
    /// content, so that newcomer may replace it. Runs with no lock held
    /// (it hashes both); the caller replaces the result only if the name
    /// still holds that blob under its locks.
    pub(super) fn corrupt_result_at(
        &self,
        parent: Ino,
        name: &[u8],
        src: &Inode,
        prepared: Option<&Prepared>,
    ) -> Result<Option<BlobId>> {
        let Some(ino) = self.store.dentry(parent, name)? else {
            return Ok(None);
        };
        let Some(existing) = self.store.inode(ino)? else {
            return Ok(None);
        };
        let (Content::Blob(id), true) = (&existing.content, Self::is_published_result(&existing))
        else {
            return Ok(None);
        };
        let verdict_of_blob = |id: &BlobId| match self.blobs.open_blob(id) {
            Ok(f) => integrity::check_file(&f).unwrap_or(Verdict::Unknown),
            Err(_) => Verdict::Unknown,
        };
        if verdict_of_blob(id) != Verdict::Corrupt {
            return Ok(None);
        }
        let newcomer = match (prepared, &src.content) {
            (Some(p), _) => integrity::check_file(&p.file).unwrap_or(Verdict::Unknown),
            (None, Content::Blob(new)) => verdict_of_blob(new),
            _ => Verdict::Unknown,
        };
        debug!(
            "check name={:?} blob={id} outcome=corrupt newcomer={newcomer:?}",
            String::from_utf8_lossy(name)
        );
        Ok((newcomer == Verdict::Valid).then_some(*id))
    }

    /// Publishes a staged inode in a shared class that no writer holds open:
    /// called when the last writer closes, and after a truncate.
    #[track_caller]
    pub fn publish_if_idle(&self, ino: Ino, share: Share) -> Result<()> {
        if !self.usage.begin_seal(ino) {
            return Ok(()); // a writer still holds it; its close publishes
        }
        debug!(
            "seal ino={ino} share={share:?} from={}",
            std::panic::Location::caller()
        );
        let result = self.publish_sealed(ino, share);
        self.end_seal(ino);
        result
    }

    /// Shares a published name with other hosts (its publication deferred
    /// that to the last reference: `Share::AtRelease`).
    pub(super) fn share_published(&self, ino: Ino) -> Result<()> {
        let _g = self.lock(&[ino]);
        let Some(inode) = self.store.inode(ino)? else {
            return Ok(());
        };
        if inode.nlink == 0 || !matches!(inode.content, Content::Blob(_)) {
            return Ok(());
        }
        let mut txn = self.txn();
        self.share(&mut txn, &inode)?;
        self.commit(txn)
    }

    /// Ends a seal; an inode unlinked meanwhile goes now if nothing holds it.
    pub(super) fn end_seal(&self, ino: Ino) {
        self.usage.end_seal(ino);
        if let Err(e) = self.maybe_forget(ino) {
            log::warn!("forget ino={ino} after publication: {e}");
        }
    }

    fn publish_sealed(&self, ino: Ino, share: Share) -> Result<()> {
        let Some(peek) = self.store.inode(ino)? else {
            return Ok(());
        };
        if peek.content != Content::Staged || !peek.class.is_blob() {
            return Ok(());
        }
        let awaiting_bind = self.usage.awaiting_bind(ino);
        if peek.nlink == 0 && !awaiting_bind {
            return Ok(()); // unlinked while open: nothing to publish
        }
        let p = self.prepare(ino, false)?;
        let mut peek = peek;
        for _ in 0..RETRIES_MAX {
            let (parent, name) = (peek.parent, peek.name.clone());
            let (g, found) = self.lock_names(&[ino], &[(parent, &name)])?;
            let Some(mut inode) = self.store.inode(ino)? else {
                return Ok(());
            };
            if inode.parent != parent || inode.name != name {
                drop(g);
                peek = inode;
                continue; // renamed meanwhile
            }
            if inode.content != Content::Staged {
                return Ok(()); // published meanwhile
            }
            let mut txn = self.txn();
            if !awaiting_bind {
                self.lock_blobs(&mut txn, &[p.id]);
                let class = inode.class;
                self.seal_into(&mut txn, &mut inode, &p, class)?;
                txn.batch.put_inode(&inode);
                if share == Share::Now {
                    self.share(&mut txn, &inode)?;
                }
                self.commit(txn)?;
                drop(g);
                return self.sync_log();
            }
            // Created under its final name: bind it now, create-only for results.
            let existing = match found[0] {
                Some(d) => self.store.inode(d)?,
                None => None,
            };
            let class = inode.class.resolve(&p.head);
            let mut ids = vec![p.id];
            ids.extend(existing.as_ref().and_then(Self::blob_of));
            self.lock_blobs(&mut txn, &ids);
            match existing {
                Some(e) if class == Class::Result && Self::is_published_result(&e) => {
                    Stats::bump(&self.stats.counters.conflicts);
                    debug!(
                        "close-publish name={:?} outcome=kept-existing",
                        String::from_utf8_lossy(&name)
                    );
                    self.discard_prepared(&mut txn, &p)?;
                    self.become_alias(&mut txn, inode, &e)?;
                }
                Some(e) if e.kind == Kind::Dir => {
                    debug!(
                        "close-publish name={:?} outcome=dropped-directory-exists",
                        String::from_utf8_lossy(&name)
                    );
                    self.discard_prepared(&mut txn, &p)?;
                    self.delete_inode(&mut txn, &inode)?;
                }
                other => {
                    self.seal_into(&mut txn, &mut inode, &p, class)?;
                    if let Some(e) = other {
                        self.unbind(&mut txn, parent, &name, e)?;
                    }
                    inode.nlink = 1;
                    txn.batch.put_inode(&inode);
                    txn.batch.put_dentry(parent, &name, ino);
                    if share == Share::Now {
                        self.share(&mut txn, &inode)?;
                    }
                    // The directory changed now (the file's mtime may be
                    // one its writer set).
                    self.touch_dir(&mut txn, self.inode(parent)?, inode.ctime_ns);
                }
            }
            // Negative entries for names bound at close are never cached
            // (`binds_at_close`), so the name is visible when close()
            // returns. This one is for the tier's negative entries and is
            // sent after the reply: a client creating in this directory
            // holds its lock while it waits for us, so a worker must never
            // wait for that lock (it would deadlock the mount).
            txn.after
                .push(After::Invalidate(Invalidate::Entry(parent, name)));
            self.commit(txn)?;
            self.usage.set_awaiting_bind(ino, false);
            drop(g);
            return self.sync_log();
        }
        Err(Error::with_context(
            libc::EAGAIN,
            format!("publish ino={ino}: renamed too often while publishing"),
        ))
    }
}
