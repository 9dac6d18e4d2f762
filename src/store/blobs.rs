//! Blob files: contents named by their BLAKE3 hash, and the staging files
//! bytes are written to before they are published.
//!
//! Invariants:
//! - A blob file's bytes hash to its name. It is made durable (fsync of the
//!   file and of its shard directory) before it is linked into place, and
//!   it is linked create-only (`link()`), so a blob file never changes.
//! - A blob is checked against its hash when it is read back from anywhere
//!   it could have been damaged; one that fails is moved to `quarantine/`
//!   and never served.
//! - "Never changes" is what casfs does; others may still write to the store
//!   (an operator, a stray tool, a bad disk). `FileIdentity` is how the core
//!   notices that a blob file is no longer the file it verified: see the
//!   verified set in `crate::fs::verified`.
//! - A blob file found damaged while correct bytes for its id are at hand
//!   (a publication just hashed them) is replaced in one `rename()`
//!   (`replace_damaged`), so its path never goes missing, and the damaged
//!   file is kept in `quarantine/`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::store::ids::{BlobId, Ino};

/// Bytes read per step while hashing or copying.
const CHUNK_BYTES: usize = 256 * 1024;

/// Most staging files kept for reuse (`retire_staging`).
pub const SPARE_STAGING_MAX: usize = 64;
/// Larger staging files are removed, not kept for reuse.
pub const SPARE_STAGING_BYTES_MAX: u64 = 1 << 20;

pub struct Blobs {
    root: PathBuf,
    /// fsync blobs and their directories before linking them in (off only
    /// for generating benchmark stores).
    durable: bool,
    /// Retired staging files (`staging/spare-N`) ready to be renamed into
    /// place for the next new file: creating and deleting a file per
    /// compiler call makes ext4 scan for recently deleted inodes, which
    /// cost more daemon CPU than anything casfs does. A leaf lock.
    spares: std::sync::Mutex<Vec<PathBuf>>,
    spare_seq: std::sync::atomic::AtomicU64,
}

/// Which file a descriptor or path is, and the metadata every change of its
/// bytes through the filesystem moves: `(st_dev, st_ino)` names the file,
/// `st_size`, `st_mtime` and `st_ctime` change with any write, truncate or
/// replacement. A `write()` sets both times, and ctime cannot be set back
/// from user space (`utimensat` sets mtime and moves ctime to now).
///
/// What it does NOT show: bytes changed below the filesystem (bit rot on
/// the disk, a controller or firmware fault, a write to the block device
/// itself) leave every field as it was; and on kernels without multigrain
/// timestamps (before Linux 6.13, or filesystems without them) a write in
/// the same clock tick (a few ms) as the `fstat` that took an identity may
/// leave the times as they were. Those are for the scrub and the sampled
/// checks of `--verify-percent` to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    /// The identity of an open file (`fstat`).
    pub fn of(file: &File) -> Result<FileIdentity> {
        file.metadata()
            .map(|m| FileIdentity::of_metadata(&m))
            .map_err(|e| Error::io(e, "fstat a blob file"))
    }

    fn of_metadata(m: &fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }

    /// The same file, whatever has happened to it since.
    pub fn same_file(&self, other: &FileIdentity) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// What hashing a file found.
pub struct Hashed {
    pub id: BlobId,
    pub size: u64,
    /// The first bytes, for classes decided by a header.
    pub head: [u8; 4],
    pub head_len: usize,
}

impl Blobs {
    pub fn new(root: &Path, durable: bool) -> Blobs {
        Blobs {
            root: root.to_path_buf(),
            durable,
            spares: std::sync::Mutex::new(Vec::new()),
            spare_seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn blob_path(&self, id: &BlobId) -> PathBuf {
        let hex = id.hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    pub fn quarantine_path(&self, id: &BlobId) -> PathBuf {
        self.root.join("quarantine").join(id.hex())
    }

    /// The identity of the file now at blob `id`'s path (`stat`, the same
    /// fields `fstat` of a descriptor on it gives); None if there is none.
    pub fn blob_identity(&self, id: &BlobId) -> Result<Option<FileIdentity>> {
        match fs::metadata(self.blob_path(id)) {
            Ok(m) => Ok(Some(FileIdentity::of_metadata(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(e, format_args!("stat blob {id}"))),
        }
    }

    /// Whether publications are fsynced (see `new`).
    pub fn durable(&self) -> bool {
        self.durable
    }

    pub fn staging_path(&self, ino: Ino) -> PathBuf {
        self.root.join("staging").join(ino.0.to_string())
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Creates (or truncates) the staging file of `ino`, reusing a retired
    /// one when there is one.
    ///
    /// A reused spare is opened without `O_TRUNC`: it is empty already
    /// (`retire_staging` empties it), and a truncate to zero arms ext4's
    /// `auto_da_alloc`, which starts writeback of the new bytes at the
    /// handle's close: a disk write per host-local file (ccache's `stats`
    /// on every call). Anything else is created or truncated.
    pub fn create_staging(&self, ino: Ino) -> Result<File> {
        let path = self.staging_path(ino);
        let spare = self.spares.lock().unwrap().pop();
        let reused = match spare {
            Some(spare) => {
                let moved = fs::rename(&spare, &path).is_ok();
                if !moved {
                    let _ = fs::remove_file(&spare);
                }
                moved
            }
            None => false,
        };
        let open = |truncate: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(truncate)
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::io(e, format_args!("create staging file {}", path.display())))
        };
        if reused {
            let f = open(false)?;
            // Invariant: a spare is empty; checked, as it is cheap (an fstat).
            match f.metadata() {
                Ok(m) if m.len() == 0 => return Ok(f),
                _ => {}
            }
        }
        open(true)
    }

    pub fn open_staging(&self, ino: Ino, write: bool) -> Result<File> {
        let path = self.staging_path(ino);
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path)
            .map_err(|e| Error::io(e, format_args!("open staging file {}", path.display())))
    }

    /// Retires the staging file of a deleted inode (no handle, no kernel
    /// reference, not being published): emptied and kept for reuse if it is
    /// small, the file's only name, and the pool has room, else removed. A staging file that
    /// is also linked as a blob is never reused (its bytes must not change).
    pub fn retire_staging(&self, ino: Ino) {
        let path = self.staging_path(ino);
        let small_and_single = fs::symlink_metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.nlink() == 1 && m.is_file() && m.len() <= SPARE_STAGING_BYTES_MAX
        });
        // Emptied first: a spare holds no space (a full disk frees at once).
        if small_and_single
            && OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(0))
                .is_ok()
        {
            let mut spares = self.spares.lock().unwrap();
            if spares.len() < SPARE_STAGING_MAX {
                let n = self
                    .spare_seq
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let spare = self.staging_dir().join(format!("spare-{n}"));
                if fs::rename(&path, &spare).is_ok() {
                    spares.push(spare);
                    return;
                }
            }
        }
        self.remove_staging(ino);
    }

    pub fn remove_staging(&self, ino: Ino) {
        let path = self.staging_path(ino);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("remove staging file {} failed: {e}", path.display());
            }
        }
    }

    pub fn open_blob(&self, id: &BlobId) -> Result<File> {
        let path = self.blob_path(id);
        File::open(&path).map_err(|e| Error::io(e, format_args!("open blob {id}")))
    }

    /// Hashes a whole file.
    pub fn hash_file(file: &File) -> Result<Hashed> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut head = [0u8; 4];
        let mut head_len = 0;
        let mut offset = 0u64;
        loop {
            let n = file
                .read_at(&mut buf, offset)
                .map_err(|e| Error::io(e, "read file to hash"))?;
            if n == 0 {
                break;
            }
            if head_len < 4 {
                let take = (4 - head_len).min(n);
                head[head_len..head_len + take].copy_from_slice(&buf[..take]);
                head_len += take;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        Ok(Hashed {
            id: BlobId(*hasher.finalize().as_bytes()),
            size: offset,
            head,
            head_len,
        })
    }

    /// True if the blob's bytes on disk still hash to its name.
    pub fn verify(file: &File, id: &BlobId) -> Result<bool> {
        Ok(Blobs::hash_file(file)?.id == *id)
    }

    /// Makes `staged` (a file whose bytes hash to `id`) the blob `id`.
    /// Returns false if the blob was already there (dedup): then the staged
    /// file is left alone for the caller to drop.
    pub fn install(&self, staged: &Path, staged_file: &File, id: &BlobId) -> Result<bool> {
        self.install_as(staged, staged_file, id, self.durable)
    }

    /// `install` with the durability chosen by the caller. A copy fetched
    /// from the shared tier is not fsynced: it can be fetched again, and a
    /// copy damaged by a power loss fails the hash check on open and is
    /// dropped like any corrupt blob.
    pub fn install_as(
        &self,
        staged: &Path,
        staged_file: &File,
        id: &BlobId,
        durable: bool,
    ) -> Result<bool> {
        let dest = self.blob_path(id);
        if dest.exists() {
            return Ok(false);
        }
        if durable {
            staged_file
                .sync_data()
                .map_err(|e| Error::io(e, format_args!("fsync {}", staged.display())))?;
        }
        match fs::hard_link(staged, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(Error::io(e, format_args!("link blob {id}"))),
        }
        let _ = fs::set_permissions(&dest, fs::Permissions::from_mode(0o444));
        if durable {
            let shard = dest.parent().expect("blob paths have a shard directory");
            File::open(shard)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(e, format_args!("fsync {}", shard.display())))?;
        }
        Ok(true)
    }

    /// Replaces the blob file of `id`, found damaged, with `staged` (a file
    /// whose bytes hash to `id`): linked under a temporary name in
    /// `staging/` (where recovery removes what a crash leaves), then renamed
    /// over the damaged file, so the blob's path always holds a file and
    /// opens never find it missing. The damaged file is kept as
    /// `quarantine/<id>` (replacing an older quarantined copy of the same
    /// id). Descriptors already open on the damaged file keep it: nothing
    /// can change what an open descriptor reads.
    pub fn replace_damaged(
        &self,
        staged: &Path,
        staged_file: &File,
        id: &BlobId,
        durable: bool,
    ) -> Result<()> {
        let n = self
            .spare_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dest = self.blob_path(id);
        let tmp = self.staging_dir().join(format!("replace-{n}"));
        if durable {
            staged_file
                .sync_data()
                .map_err(|e| Error::io(e, format_args!("fsync {}", staged.display())))?;
        }
        let _ = fs::remove_file(&tmp);
        fs::hard_link(staged, &tmp)
            .map_err(|e| Error::io(e, format_args!("link the replacement of damaged blob {id}")))?;
        let _ = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444));
        // Kept for inspection; failing to keep it only loses the evidence.
        let q_tmp = self.staging_dir().join(format!("quarantine-{n}"));
        let _ = fs::remove_file(&q_tmp);
        if let Err(e) =
            fs::hard_link(&dest, &q_tmp).and_then(|()| fs::rename(&q_tmp, self.quarantine_path(id)))
        {
            log::warn!("keeping damaged blob {id} in quarantine failed: {e}; replacing it anyway");
            let _ = fs::remove_file(&q_tmp);
        }
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(
                e,
                format_args!("rename the replacement of damaged blob {id} into place"),
            ));
        }
        if durable {
            let shard = dest.parent().expect("blob paths have a shard directory");
            File::open(shard)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(e, format_args!("fsync {}", shard.display())))?;
        }
        Ok(())
    }

    /// Copies `src` into a fresh file at `dest` (for publishing bytes that a
    /// writer still holds open, and for copy-up of a blob about to change).
    pub fn copy_file(src: &File, dest: &File, limit: Option<u64>) -> Result<()> {
        Blobs::copy_hashing(src, dest, limit, None)
    }

    /// `copy_file` from the blob `id`'s file, checking its bytes on the way:
    /// all of `src` is read and hashed (past `limit` too), so a copy is only
    /// ever made from bytes that still hash to `id`. False: they do not.
    pub fn copy_blob_checked(
        src: &File,
        dest: &File,
        limit: Option<u64>,
        id: &BlobId,
    ) -> Result<bool> {
        let mut hasher = blake3::Hasher::new();
        Blobs::copy_hashing(src, dest, limit, Some(&mut hasher))?;
        Ok(BlobId(*hasher.finalize().as_bytes()) == *id)
    }

    /// Copies `src` to `dest` up to `limit`; with a hasher, reads on to
    /// the end of `src` and hashes every byte read.
    fn copy_hashing(
        src: &File,
        dest: &File,
        limit: Option<u64>,
        mut hasher: Option<&mut blake3::Hasher>,
    ) -> Result<()> {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut offset = 0u64;
        loop {
            let copy_left = limit.map_or(u64::MAX, |l| l.saturating_sub(offset));
            if copy_left == 0 && hasher.is_none() {
                break;
            }
            let want = if hasher.is_some() {
                CHUNK_BYTES
            } else {
                (copy_left as usize).min(CHUNK_BYTES)
            };
            let n = src
                .read_at(&mut buf[..want], offset)
                .map_err(|e| Error::io(e, "copy: read"))?;
            if n == 0 {
                break;
            }
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&buf[..n]);
            }
            let copy = (n as u64).min(copy_left) as usize;
            if copy > 0 {
                dest.write_all_at(&buf[..copy], offset)
                    .map_err(|e| Error::io(e, "copy: write"))?;
            }
            offset += n as u64;
        }
        Ok(())
    }

    pub fn remove_blob(&self, id: &BlobId) {
        let path = self.blob_path(id);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("remove blob {id} failed: {e}");
            }
        }
    }

    /// True if a blob with this id was quarantined (its file moved aside).
    pub fn is_quarantined(&self, id: &BlobId) -> bool {
        self.quarantine_path(id).exists()
    }

    /// Moves a blob that failed verification out of the way.
    pub fn quarantine(&self, id: &BlobId) {
        let from = self.blob_path(id);
        let to = self.quarantine_path(id);
        if let Err(e) = fs::rename(&from, &to) {
            log::warn!("quarantine blob {id} failed: {e}; removing it");
            self.remove_blob(id);
        }
    }

    /// The blob files of shard directory `blobs/<shard>/`, sorted by id,
    /// each with its path; names that are no blob id of that shard are
    /// left out (`casfs fsck` reports them).
    pub fn shard_files(&self, shard: u8) -> io::Result<Vec<(BlobId, PathBuf)>> {
        let dir = self.root.join("blobs").join(format!("{shard:02x}"));
        let mut out = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(BlobId::from_hex) else {
                continue;
            };
            if id.0[0] == shard && name.to_str() == Some(id.hex().as_str()) {
                out.push((id, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Names of files in the staging directory (bounded by the number of
    /// files being written plus host-local files).
    pub fn staging_files(&self) -> Vec<(String, PathBuf)> {
        let Ok(rd) = fs::read_dir(self.staging_dir()) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect()
    }
}
