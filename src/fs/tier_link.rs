//! The one seam between the core and the shared tier: what is uploaded
//! when a name is published, what a local miss asks the tier, and how a
//! lost create-only race between hosts converges.
//!
//! Invariants:
//! - Network calls (fetches) happen with no lock held; what they bring is
//!   verified against its hash by the tier before the core sees it, and is
//!   bound under the directory's stripe only if the name is still free.
//! - Uploads are queued after the commit that publishes (never waited on),
//!   and written to the store in that commit's batch (`Core as Outbox`).

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use log::{debug, info, warn};

use crate::classes::Class;
use crate::error::{Error, Result};
use crate::fs::txn::{After, Txn};
use crate::fs::{Attr, Caller, Core, Invalidate};
use crate::shared::tier::{Local, Outbox, Tier, Upload};
use crate::shared::{Record, RecordKind};
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{Content, Inode, Kind, PendingUpload};

impl Core {
    /// Connects the core to a shared tier (once, at mount); timestamps
    /// taken from it move the clock at most `clock_ahead_max_ns` past wall
    /// time.
    pub fn attach_tier(&self, tier: Arc<Tier>, clock_ahead_max_ns: u64) {
        self.clock.set_ahead_max_ns(clock_ahead_max_ns);
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
    pub(super) fn share(&self, txn: &mut Txn, inode: &Inode) -> Result<()> {
        if self.tier.get().is_none() || !inode.class.is_blob() {
            return Ok(());
        }
        let Content::Blob(id) = inode.content else {
            return Ok(());
        };
        let pending = PendingUpload {
            seq: self.now(),
            path: self.path_of(inode.parent, &inode.name)?.join(&b'/'),
            create_only: inode.class == Class::Result,
            blob: id,
            size: inode.size,
            mode: inode.perm,
            mtime_ns: inode.mtime_ns,
        };
        // Durable with the publication; removed when the tier has it.
        txn.batch.put_upload(&pending);
        txn.after.push(After::Upload(self.upload_of(pending)));
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
        // Create-only keeps the first *valid* content: a winner that fails
        // its own checksum does not replace ours (which may be the valid
        // recompile that healed it here).
        if crate::integrity::check_bytes(&bytes) == crate::integrity::Verdict::Corrupt {
            warn!(
                "converge {:?}: the shared tier's result {blob} fails its own checksum; keeping ours",
                String::from_utf8_lossy(path)
            );
            return;
        }
        let result = (|| -> Result<()> {
            let Some((parent, name, ino)) = self.resolve_path(path)? else {
                return Ok(());
            };
            let fetched = self.stage_fetched(&bytes)?;
            let (_g, found) = self.lock_names(&[], &[(parent, &name)])?;
            if found[0] != Some(ino) {
                return Ok(());
            }
            let Some(mut inode) = self.store.inode(ino)? else {
                return Ok(());
            };
            if !Self::is_published_result(&inode) || inode.content == Content::Blob(blob) {
                return Ok(());
            }
            let mut txn = self.txn();
            let mut ids = vec![blob];
            ids.extend(Self::blob_of(&inode));
            self.lock_blobs(&mut txn, &ids);
            self.install_fetched(&mut txn, &fetched, blob, bytes.len() as u64)?;
            if let Content::Blob(old) = inode.content {
                self.drop_ref(&mut txn, old, ino, inode.size)?;
            }
            self.add_ref(&mut txn, blob, ino, size);
            let winner_mtime_ns = self.clock.observe(winner.mtime_ns);
            inode.content = Content::Blob(blob);
            inode.size = size;
            inode.mtime_ns = inode.mtime_ns.max(winner_mtime_ns);
            inode.ctime_ns = self.now();
            txn.batch.put_inode(&inode);
            txn.after.push(After::InvalidateNow(Invalidate::Data(ino)));
            txn.after
                .push(After::Invalidate(Invalidate::Entry(parent, name.clone())));
            self.commit(txn)?;
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

    /// Writes fetched bytes (verified by the tier) to a temporary file,
    /// outside any lock; `install_fetched` links it into place.
    fn stage_fetched(&self, bytes: &[u8]) -> Result<Fetched> {
        let n = self
            .open_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.blobs.staging_dir().join(format!("fetch-{n}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(e, "create fetched blob"))?;
        let fetched = Fetched { path, file };
        fetched
            .file
            .write_all_at(bytes, 0)
            .map_err(|e| Error::io(e, "write fetched blob"))?;
        Ok(fetched)
    }

    /// Records a fetched blob (its stripe held), linking its file in place.
    fn install_fetched(&self, txn: &mut Txn, f: &Fetched, id: BlobId, size: u64) -> Result<()> {
        self.blobs.install_copy(&f.path, &f.file, &id)?;
        if !self.store.blob_known(&id)? && !txn.new_blobs.contains(&id) {
            self.add_blob(txn, id, size);
        }
        Ok(())
    }

    /// A lookup that missed locally asks the shared tier; what it finds
    /// (verified) becomes a local name, so the next hit is local. Counts
    /// the kernel's reference to what it returns.
    pub(super) fn lookup_shared(&self, parent: Ino, name: &[u8]) -> Result<Option<Attr>> {
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
        let Some((mut record, bytes)) = tier.fetch(&path) else {
            return Ok(None);
        };
        // A record from a host whose clock runs fast is shown no further
        // ahead than the clock may move (see `Clock::observe`).
        record.mtime_ns = self.clock.observe(record.mtime_ns);
        let fetched = match &bytes {
            Some(b) => Some(self.stage_fetched(b)?),
            None => None,
        };
        let ino = self.alloc_ino()?;
        let _g = self.lock(&[parent]);
        if let Some(existing) = self.store.dentry(parent, name)? {
            // Appeared meanwhile.
            let Some(inode) = self.store.inode(existing)? else {
                return Ok(None);
            };
            self.usage.remember(existing);
            return Ok(Some(self.attr_of(&inode)));
        }
        let dir = self.inode(parent)?;
        let mut txn = self.txn();
        let now = self.now();
        let owner = Caller {
            uid: dir.uid,
            gid: dir.gid,
        };
        let inode = match (&record.kind, &bytes, &fetched) {
            (RecordKind::Dir, _, _) => {
                let perm = dir.perm & 0o7777;
                let mut d =
                    self.new_inode(ino, Kind::Dir, Class::Local, perm, owner, &dir, name, now);
                d.mtime_ns = record.mtime_ns.min(now);
                d
            }
            (RecordKind::File { blob, size, mode }, Some(bytes), Some(f)) => {
                self.lock_blobs(&mut txn, &[*blob]);
                self.install_fetched(&mut txn, f, *blob, bytes.len() as u64)?;
                let class = class.resolve(&bytes[..bytes.len().min(4)]);
                let mut f = self.new_inode(ino, Kind::File, class, *mode, owner, &dir, name, now);
                f.content = Content::Blob(*blob);
                f.size = *size;
                f.mtime_ns = record.mtime_ns;
                self.add_ref(&mut txn, *blob, ino, *size);
                f
            }
            _ => return Ok(None),
        };
        txn.batch.put_inode(&inode);
        txn.batch.put_dentry(parent, name, ino);
        self.usage.remember(ino);
        if let Err(e) = self.commit(txn) {
            self.usage.forget(ino, 1);
            return Err(e);
        }
        debug!(
            "fetch name={:?} ino={ino} from the shared tier",
            String::from_utf8_lossy(name)
        );
        Ok(Some(self.attr_of(&inode)))
    }
}

/// Fetched bytes in a temporary file, removed when dropped.
struct Fetched {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Core {
    /// Uploads the store holds for a shared tier (a scan; at mount).
    pub fn uploads_waiting(&self) -> u64 {
        Outbox::count(self)
    }

    fn upload_of(&self, p: PendingUpload) -> Upload {
        Upload {
            seq: p.seq,
            record: Record {
                kind: RecordKind::File {
                    blob: p.blob,
                    size: p.size,
                    mode: p.mode,
                },
                mtime_ns: p.mtime_ns,
            },
            path: p.path,
            create_only: p.create_only,
            blob_file: self.blobs.blob_path(&p.blob),
            blob: p.blob,
        }
    }
}

/// The durable upload queue lives in the store (`Cf::Uploads`); the tier
/// reads it back and removes what it delivered. Store errors are logged:
/// an upload that cannot be read now is read again at the next refill.
impl Outbox for Core {
    fn pending(&self, limit: usize) -> Vec<Upload> {
        match self.store.pending_uploads(limit) {
            Ok(v) => v.into_iter().map(|p| self.upload_of(p)).collect(),
            Err(e) => {
                warn!("read pending uploads: {e}");
                Vec::new()
            }
        }
    }

    fn oldest_seq(&self) -> std::result::Result<Option<u64>, String> {
        self.store.oldest_upload_seq().map_err(|e| e.to_string())
    }

    fn count(&self) -> u64 {
        self.store.count_uploads().unwrap_or_else(|e| {
            warn!("count pending uploads: {e}");
            0
        })
    }

    fn local(&self, up: &Upload) -> Local {
        match self.store.upload_is_pending(up.seq, &up.path) {
            Ok(false) => return Local::Settled,
            Ok(true) => {}
            Err(e) => warn!("read pending upload: {e}"),
        }
        let ino = match self.resolve_path(&up.path) {
            Ok(Some((_, _, ino))) => ino,
            Ok(None) => return Local::Gone,
            Err(_) => return Local::Current,
        };
        match self.store.inode(ino) {
            Ok(Some(i)) if i.content == Content::Blob(up.blob) => Local::Current,
            Ok(Some(_)) => Local::Replaced,
            Ok(None) => Local::Gone,
            Err(_) => Local::Current,
        }
    }

    fn remove(&self, up: &Upload) {
        if let Err(e) = self.store.delete_upload(up.seq, &up.path) {
            warn!(
                "forget delivered upload of {:?}: {e} (it may be delivered again)",
                String::from_utf8_lossy(&up.path)
            );
        }
    }

    fn tick(&self) -> u64 {
        self.now()
    }
}
