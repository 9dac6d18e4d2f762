//! The verified set: which blob files may be served without hashing them
//! again, and the checks that put blob files into it or find them damaged.
//!
//! The rule (it closes the "verified once, trusted forever" hole):
//! - A blob is trusted only while its file is the file that was verified.
//!   `verified` remembers, per blob id, the `FileIdentity` (device, inode,
//!   size, mtime, ctime) from `fstat` of the very descriptor that was
//!   hashed, taken before the hash and found unchanged after it.
//! - An open, or a publication about to dedup onto the blob, takes the
//!   identity of the file it is about to use; if it differs in any field
//!   from the remembered one, the file was written, truncated, touched or
//!   replaced since it was verified, and it is hashed again before a byte of
//!   it is used (whatever `--verify-percent` says: a changed file is suspect).
//! - What the rule does NOT catch: bytes that change without moving the
//!   file's metadata (bit rot below the filesystem, a fault in the disk or
//!   its controller, a write to the block device itself), and, on kernels
//!   without multigrain timestamps (before Linux 6.13), a write within the
//!   same clock tick as the `fstat` that took the identity. Those are what
//!   the background scrub (`scrub_one`, every blob in turn at random) and
//!   the sampled first-open checks are for.
//! - Only a hash that passed puts an identity in the set; a blob found
//!   damaged leaves it (`drop_corrupt`, `settle_blob_file`).
//!
//! A new publication whose bytes are already stored (dedup) checks the file
//! it dedups onto first (`check_existing` with no lock held, again under
//! the blob's stripe only if the file changed in between): a file that does
//! not hash to its id is replaced, in one rename, by the bytes the
//! publication just hashed, and the damaged one is quarantined and counted
//! (`corrupt_blobs`). Cost: one read of the existing blob per dedup, except
//! when the blob is in the set with an unchanged identity (it was verified
//! by an open or an earlier dedup in this mount and nothing touched it
//! since), which is the common case for a blob in use.

use log::{debug, warn};

use crate::error::Result;
use crate::fs::locks::SHARDS;
use crate::fs::txn::{After, Txn};
use crate::fs::{Core, Invalidate, DIR_ENTRIES_MAX, VERIFIED_BLOBS_MAX};
use crate::stats::Stats;
use crate::store::blobs::{Blobs, FileIdentity};
use crate::store::ids::BlobId;

/// What checking the file already at a blob's path found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Existing {
    /// No file there.
    Absent,
    /// The file in the verified set, or one that just passed its hash (now
    /// in the set).
    Good,
    /// A file that does not hash to its id, with the identity it had.
    Damaged(FileIdentity),
    /// A file that changed while it was being hashed: someone is writing it.
    Changing,
}

impl Core {
    /// True if `now` (the identity of blob `id`'s file as it is about to be
    /// used) is the identity the verified set remembers for it.
    pub(super) fn trusted(&self, id: &BlobId, now: &FileIdentity) -> bool {
        self.remembered(id).as_ref() == Some(now)
    }

    /// The identity the blob's file had when it last passed its hash.
    pub(super) fn remembered(&self, id: &BlobId) -> Option<FileIdentity> {
        self.verified.with(id, |m| m.get(id).copied())
    }

    /// Records that the file with identity `ident` hashed to `id`: taken by
    /// `fstat` of the descriptor that was hashed, before the hash, and found
    /// the same after it.
    pub(super) fn remember_verified(&self, id: BlobId, ident: FileIdentity) {
        self.verified.with(&id, |m| {
            if m.len() >= VERIFIED_BLOBS_MAX / SHARDS && !m.contains_key(&id) {
                m.clear();
            }
            m.insert(id, ident);
        });
    }

    pub(super) fn forget_verified(&self, id: &BlobId) {
        self.verified.with(id, |m| m.remove(id));
    }

    /// Hashes the open blob file `file` of `id`, whose identity before the
    /// hash was `before`. Some(true) if it passed (and it is remembered),
    /// Some(false) if it does not hash to its id, None if the file changed
    /// while it was read (its verdict says nothing about its bytes now).
    pub(super) fn hash_blob_file(
        &self,
        id: &BlobId,
        file: &std::fs::File,
        before: &FileIdentity,
    ) -> Result<Option<bool>> {
        Stats::bump(&self.stats.counters.blobs_verified);
        let good = Blobs::verify(file, id)?;
        if FileIdentity::of(file)? != *before {
            self.forget_verified(id);
            return Ok(None);
        }
        if good {
            self.remember_verified(*id, *before);
        } else {
            self.forget_verified(id);
        }
        Ok(Some(good))
    }

    /// Checks the file at blob `id`'s path before a publication dedups onto
    /// it: trusted if the verified set vouches for it, else hashed. No lock
    /// needed (it only reads, and the verdict is re-checked under the blob's
    /// stripe by `settle_blob_file`).
    pub(super) fn check_existing(&self, id: &BlobId) -> Result<Existing> {
        let file = match std::fs::File::open(self.blobs.blob_path(id)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Absent),
            Err(e) => {
                return Err(crate::error::Error::io(
                    e,
                    format_args!("open blob {id} to check it before dedup"),
                ))
            }
        };
        let before = FileIdentity::of(&file)?;
        if self.trusted(id, &before) {
            return Ok(Existing::Good);
        }
        Ok(match self.hash_blob_file(id, &file, &before)? {
            Some(true) => Existing::Good,
            Some(false) => Existing::Damaged(before),
            None => Existing::Changing,
        })
    }

    /// Makes the file at blob `id`'s path one that holds the bytes of
    /// `staged` (a file whose bytes were just hashed to `id`), under the
    /// blob's stripe (held by the caller): links `staged` if no file is
    /// there; keeps the file there if it is `staged` itself or trusted;
    /// replaces it if it is damaged. `found` is what `check_existing` found
    /// before the lock: used only if the file is still that same file;
    /// otherwise (it changed in between, or was never checked) it is
    /// checked now, under the stripe (a rare, known wait).
    ///
    /// Invariant: after this returns Ok, the blob's path holds `staged`'s
    /// own file (linked now or earlier), or a file that hashed to `id` and
    /// whose identity has not changed since.
    pub(super) fn settle_blob_file(
        &self,
        txn: &mut Txn,
        id: &BlobId,
        staged: &std::path::Path,
        staged_file: &std::fs::File,
        durable: bool,
        found: Existing,
    ) -> Result<()> {
        Self::assert_held(txn, id);
        let Some(now) = self.blobs.blob_identity(id)? else {
            // Removed (its last name went) or quarantined meanwhile.
            self.blobs.install_as(staged, staged_file, id, durable)?;
            return Ok(());
        };
        // Its own file: the bytes this publication hashed, linked by it.
        if now.same_file(&FileIdentity::of(staged_file)?) || self.trusted(id, &now) {
            return Ok(());
        }
        let damaged = match found {
            Existing::Damaged(seen) if seen == now => true,
            _ => match self.check_existing(id)? {
                Existing::Absent => {
                    self.blobs.install_as(staged, staged_file, id, durable)?;
                    return Ok(());
                }
                Existing::Good => false,
                Existing::Damaged(_) | Existing::Changing => true,
            },
        };
        if !damaged {
            return Ok(());
        }
        warn!(
            "corrupt blob={id}: the stored file does not match its hash; replaced by the bytes just hashed for a publication or fetch of it, the damaged file quarantined"
        );
        self.forget_verified(id);
        self.blobs
            .replace_damaged(staged, staged_file, id, durable)?;
        Stats::bump(&self.stats.counters.corrupt_blobs);
        // Names of this blob now read the good file. Pages the kernel may
        // hold of the damaged one (read unverified, or through a descriptor
        // opened before the damage) go.
        for ino in self.store.blob_refs(id, DIR_ENTRIES_MAX)? {
            txn.after.push(After::Invalidate(Invalidate::Data(ino)));
        }
        debug!("dedup blob={id} outcome=replaced-damaged-file");
        Ok(())
    }
}
