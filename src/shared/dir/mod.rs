//! The shared-directory engine: hosts share records and blobs through a
//! POSIX directory they all mount (NFS, CephFS, or a local disk for tests
//! and single hosts). URL: `file:///ABSOLUTE/PATH`.
//!
//! Files: `listing.rs` (listing file names), `nfs.rs` (NFS-safe file
//! primitives), this file (the engine), `tests.rs`.
//!
//! Layout under ROOT (these names are forever: add new ones, never rename):
//! ```text
//! ROOT/casfs-shared                         marker, "casfs shared format 1\n"
//! ROOT/ns/<namespace>/records/<H:2>/<H>     a record: Record::encode() bytes
//! ROOT/ns/<namespace>/lists/<H:2>/<H>/<k>.<E>   an empty file: the name E
//!                                           is listed in directory H (k: f
//!                                           file, d directory)
//! ROOT/ns/<namespace>/lists/<H:2>/<H>/path  the directory's path bytes
//!                                           (written with the listing, so
//!                                           the sweep can find its names'
//!                                           records)
//! ROOT/blobs/<B:2>/<B>                      a blob: its bytes (all namespaces)
//! ROOT/tmp/<hostname>.<pid>.<counter>.tmp   files being written
//! ROOT/leases/<name>                        a lease: encode_lease() bytes
//! ```
//! A record file's mtime is its last use (set by its put and by
//! `note_used`, with `UTIME_NOW`: the file server's idea of now, which
//! needs only write permission); a blob file's mtime is its last put.
//! H is the BLAKE3 hex of the record's path bytes (paths can be long, deep
//! and binary; hashing flattens them into one fixed-size name), B is the
//! blob id in hex, `<X:2>` the first two hex digits of X. In a listing, H
//! is the hash of the directory's path and E the name with every byte
//! outside `[A-Za-z0-9._-]` written `%XX` (a name whose escape is over
//! `LIST_NAME_BYTES_MAX` is not listed).
//!
//! Protocol (NFS-safe; every file is written whole in `ROOT/tmp`, fsynced,
//! then bound to its name in one call on the same file system):
//! - create-only record and blob: if the final name exists, done (a record
//!   reports it: `Put::Exists`); else `link()` the temp file to the name.
//!   EEXIST means another writer won (a record reports theirs: `Put::Exists`;
//!   a blob is the same bytes: success). A link whose reply was lost and
//!   retransmitted can report EEXIST although it succeeded, so a failed
//!   link is checked against the temp file's link count (2 = it was ours),
//!   as open(2) recommends for O_EXCL on NFS.
//! - replace record (`create_only = false`): `rename()` the temp file onto
//!   the final name (atomic, last writer wins). Only mutable records are
//!   ever renamed over; a create-only name is never replaced.
//! - reads open the final name and read it whole. ENOENT is a miss; ESTALE
//!   (the name was replaced between lookup and read) is retried once, then
//!   is a miss. A record that does not decode, a file over its bound or a
//!   directory where a record should be is a `Data` error naming the file.
//!   Blobs come back unverified.
//! - listing: after a record is bound (or found), each level of its path
//!   is made sure of in its parent's listing (a stat; an empty file created
//!   create-only when missing). A path with no record but a listing
//!   directory reads as a directory (`Record::implied_dir`).
//! - replace a damaged record: rename the name to a temp name of ours (one
//!   host wins that rename), check the moved file is the damaged version,
//!   then link the newcomer create-only; if what was moved was not the
//!   damaged version, link it back (create-only) and report false.
//! - compare-and-delete a record (collection) and take over or renew a
//!   lease: the same rename-away-and-check (`take_away`); a record is then
//!   unlinked, a lease replaced by a create-only link (two hosts that both
//!   saw an expired lease: one wins the rename, the other finds nothing
//!   to move, or the winner's new lease, and loses).
//! - delete a blob: stat, and unlink if its mtime is before the bound. A
//!   put of the same blob between the two loses its bytes (a miss for the
//!   record that follows, which is dropped); the window is one round trip
//!   and the bound is the grace period before it.
//!
//! Invariants:
//! - A final name only ever appears with complete, fsynced content: nothing
//!   is written in place under a final name.
//! - A create-only name, once bound, keeps its content (we never rename or
//!   write over it; eviction, if any, is an unlink by another tool).
//! - Every temp file we create is unlinked when the call ends (a crash can
//!   leave one behind: `open` sweeps temp files older than
//!   `TMP_STALE_SECS`); we never unlink a temp file we did not create.
//! - Files get mode `0666 & !umask`, directories `0777 & !umask`, set with
//!   fchmod/chmod right after creation, whatever the process umask is.
//!
//! Not done here: file-system calls have no timeout of their own (a hung
//! NFS server blocks the calling thread); the caller runs engine calls
//! under its own deadline. Names are not fsynced in their directory: after
//! a crash of a local-disk ROOT a just-bound name may be missing (a later
//! miss, never wrong content); NFS commits names on the server at once.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use log::{debug, warn};

use super::{
    listing_chain, Engine, EngineConfig, Listed, Put, Record, RecordKind, Seen, TierError,
    TierResult, RECORD_BYTES_MAX,
};
use crate::store::ids::BlobId;

mod listing;
mod nfs;
#[cfg(test)]
mod tests;

use listing::list_entry_name;
pub(crate) use listing::parse_list_entry;
pub(crate) use nfs::check_marker;
use nfs::{first_foreign_entry, hostname, io_error, is_stale, read_once, ReadFail, TempFile};

/// The marker file's name under ROOT, and the one format this code knows.
pub const MARKER_NAME: &str = "casfs-shared";
const MARKER_PREFIX: &str = "casfs shared format ";
pub const MARKER_FORMAT: u32 = 1;
/// The only names that may sit in ROOT; a ROOT holding just these (and no
/// marker) is an initialisation that was interrupted or is under way on
/// another host, and is adopted.
const LAYOUT_NAMES: [&str; 5] = [MARKER_NAME, "ns", "blobs", "tmp", "leases"];
/// Bound on the names of one shard directory a scan page reads (a shard
/// holds 1/256 of the records: about 4,000 at 1M).
const SHARD_NAMES_MAX: usize = 1 << 20;
/// The file in a listing directory that holds the directory's path (no
/// `f.`/`d.` prefix: never read as a name).
const LISTING_PATH_NAME: &str = "path";
/// Bound on attempts to take a lease whose file keeps changing.
const LEASE_ATTEMPTS_MAX: usize = 4;

/// A record is about 130 bytes; anything much bigger is not one.
const MARKER_BYTES_MAX: u64 = 256;
/// Temp files older than this are left over from a crash; `open` removes
/// them (a live one exists for the length of one put).
const TMP_STALE_SECS: u64 = 24 * 3600;
/// Bound on the temp files one `open` looks at when sweeping.
const TMP_SWEEP_FILES_MAX: usize = 10_000;
/// Bound on fresh temp names tried when one is taken (a host with the same
/// name and pid, e.g. containers, or a leftover from before a reboot).
const TEMP_NAME_ATTEMPTS_MAX: usize = 64;
/// Bound on `link()` attempts for one create-only record whose existing
/// record vanishes (is evicted) between our EEXIST and our read.
const CREATE_ATTEMPTS_MAX: usize = 2;
const HOSTNAME_BYTES_MAX: usize = 64;

/// Longest escaped name a listing holds (NAME_MAX less the kind prefix).
const LIST_NAME_BYTES_MAX: usize = 250;

/// Temp file counter, process-wide so two engines in one process (two
/// namespaces, tests) never pick the same name.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

pub struct DirEngine {
    root: PathBuf,
    records_dir: PathBuf,
    lists_dir: PathBuf,
    blobs_dir: PathBuf,
    tmp_dir: PathBuf,
    leases_dir: PathBuf,
    file_mode: u32,
    dir_mode: u32,
    /// `<hostname>.<pid>.`: the start of our temp file names.
    temp_prefix: String,
    healed: AtomicU64,
}

/// A record file as read.
enum Raw {
    Missing,
    Good(Record),
    Damaged(Seen, TierError),
}

impl DirEngine {
    /// Opens (and, if ROOT is new or empty, initialises) the shared
    /// directory at `root` for `config.namespace`.
    pub fn open(root: &Path, config: &EngineConfig) -> Result<DirEngine, String> {
        if !root.is_absolute() {
            return Err(format!(
                "shared directory {}: the path must be absolute",
                root.display()
            ));
        }
        if !super::valid_namespace(&config.namespace) {
            return Err(format!(
                "shared directory {}: bad namespace {:?}",
                root.display(),
                config.namespace
            ));
        }
        let umask = config.umask & 0o777;
        let ns_dir = root.join("ns").join(&config.namespace);
        let engine = DirEngine {
            root: root.to_path_buf(),
            records_dir: ns_dir.join("records"),
            lists_dir: ns_dir.join("lists"),
            blobs_dir: root.join("blobs"),
            tmp_dir: root.join("tmp"),
            leases_dir: root.join("leases"),
            file_mode: 0o666 & !umask,
            dir_mode: 0o777 & !umask,
            temp_prefix: format!("{}.{}.", hostname(), std::process::id()),
            healed: AtomicU64::new(0),
        };
        engine
            .init(&ns_dir)
            .map_err(|e| format!("shared directory {}: {e}", root.display()))?;
        debug!(
            "shared open dir={} namespace={}",
            root.display(),
            config.namespace
        );
        Ok(engine)
    }

    fn init(&self, ns_dir: &Path) -> Result<(), String> {
        self.make_dir_all(&self.root)
            .map_err(|e| format!("cannot create it: {e}"))?;
        let marker = self.root.join(MARKER_NAME);
        match self
            .read_tolerant(&marker, MARKER_BYTES_MAX)
            .map_err(|e| e.to_string())?
        {
            Some(text) => check_marker(&text)?,
            None => {
                if let Some(name) = first_foreign_entry(&self.root)? {
                    return Err(format!(
                        "it is not empty ({name:?} is there) and has no {MARKER_NAME} marker: \
                         refusing to use a directory casfs did not create (give an empty or new one)"
                    ));
                }
                self.create_layout()?;
                self.create_marker(&marker)?;
            }
        }
        // Idempotent: also repairs a layout an earlier open left unfinished.
        self.create_layout()?;
        for dir in [
            &self.root.join("ns"),
            ns_dir,
            &self.records_dir,
            &self.lists_dir,
        ] {
            self.make_dir(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        self.sweep_stale_temps();
        Ok(())
    }

    fn create_layout(&self) -> Result<(), String> {
        for dir in [
            &self.tmp_dir,
            &self.blobs_dir,
            &self.root.join("ns"),
            &self.leases_dir,
        ] {
            self.make_dir(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// Writes the marker create-only, so two hosts initialising one ROOT at
    /// once agree on it.
    fn create_marker(&self, marker: &Path) -> Result<(), String> {
        let text = format!("{MARKER_PREFIX}{MARKER_FORMAT}\n");
        let fail = |e: io::Error| format!("cannot write {}: {e}", marker.display());
        let temp = self.write_temp(text.as_bytes()).map_err(fail)?;
        if !self.link_into(&temp, marker).map_err(fail)? {
            let text = self
                .read_tolerant(marker, MARKER_BYTES_MAX)
                .map_err(|e| e.to_string())?;
            check_marker(text.as_deref().unwrap_or(b""))?;
        }
        Ok(())
    }

    /// Removes temp files a crash left behind (best effort, bounded).
    fn sweep_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.tmp_dir) else {
            return;
        };
        let now = SystemTime::now();
        let stale = Duration::from_secs(TMP_STALE_SECS);
        for entry in entries.take(TMP_SWEEP_FILES_MAX).flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > stale);
            if old && entry.file_name().as_encoded_bytes().ends_with(b".tmp") {
                match fs::remove_file(entry.path()) {
                    Ok(()) => debug!(
                        "shared sweep temp={} outcome=removed",
                        entry.path().display()
                    ),
                    Err(e) => debug!(
                        "shared sweep temp={} outcome=kept error={e}",
                        entry.path().display()
                    ),
                }
            }
        }
    }

    fn record_path(&self, path: &[u8]) -> PathBuf {
        let h = blake3::hash(path).to_hex();
        self.records_dir.join(&h[..2]).join(h.as_str())
    }

    fn list_dir_path(&self, path: &[u8]) -> PathBuf {
        let h = blake3::hash(path).to_hex();
        self.lists_dir.join(&h[..2]).join(h.as_str())
    }

    /// Makes sure every level of `path` is in its parent's listing.
    fn list_chain(&self, path: &[u8], is_dir: bool) -> TierResult<()> {
        for (parent, name, dir) in listing_chain(path, is_dir) {
            let Some(entry) = list_entry_name(name, dir) else {
                debug!(
                    "shared list name={:?} outcome=not-listed-too-long",
                    name.escape_ascii().to_string()
                );
                continue;
            };
            let ldir = self.list_dir_path(parent);
            let file = ldir.join(&entry);
            if fs::symlink_metadata(&file).is_ok() {
                continue;
            }
            let create = || {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&file)
                    .and_then(|f| f.set_permissions(Permissions::from_mode(self.file_mode)))
            };
            let mut r = create();
            if matches!(&r, Err(e) if e.kind() == io::ErrorKind::NotFound) {
                if let Some(shard) = ldir.parent() {
                    self.make_dir(shard)
                        .map_err(|e| io_error("create", shard, e))?;
                }
                self.make_dir(&ldir)
                    .map_err(|e| io_error("create", &ldir, e))?;
                self.write_listing_path(&ldir, parent);
                r = create();
            }
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("create", &file, e)),
            }
        }
        Ok(())
    }

    fn blob_path(&self, id: &BlobId) -> PathBuf {
        let hex = id.hex();
        self.blobs_dir.join(&hex[..2]).join(&hex)
    }

    /// Creates one directory with our mode; an existing one is left as is.
    fn make_dir(&self, dir: &Path) -> io::Result<()> {
        match fs::create_dir(dir) {
            Ok(()) => fs::set_permissions(dir, Permissions::from_mode(self.dir_mode)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates `dir` and its missing ancestors (only for ROOT at open: once
    /// open, a missing ROOT is an unmounted share, never recreated).
    fn make_dir_all(&self, dir: &Path) -> io::Result<()> {
        match self.make_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = dir.parent() {
                    self.make_dir_all(parent)?;
                }
                self.make_dir(dir)
            }
            other => other,
        }
    }

    /// Writes `bytes` to a new temp file with our file mode, fsyncs and
    /// closes it. The returned guard unlinks it when dropped.
    fn write_temp(&self, bytes: &[u8]) -> io::Result<TempFile> {
        self.write_temp_from(
            &mut &bytes[..],
            bytes.len() as u64,
            &super::Progress::default(),
        )
    }

    /// Like `write_temp`, streaming `len` bytes from `source` (a chunk at a
    /// time, counted in `progress`).
    fn write_temp_from(
        &self,
        source: &mut dyn Read,
        len: u64,
        progress: &super::Progress,
    ) -> io::Result<TempFile> {
        let mut attempts = 0;
        let (mut file, path) = loop {
            attempts += 1;
            let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let path = self.tmp_dir.join(format!("{}{n}.tmp", self.temp_prefix));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => break (file, path),
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists
                        && attempts < TEMP_NAME_ATTEMPTS_MAX =>
                {
                    continue
                }
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound && attempts < TEMP_NAME_ATTEMPTS_MAX =>
                {
                    // Someone removed ROOT/tmp; ROOT itself must still be there.
                    self.make_dir(&self.tmp_dir)?;
                }
                Err(e) => return Err(e),
            }
        };
        let temp = TempFile { path, armed: true };
        super::copy_counted(source, &mut file, len, progress)?;
        file.set_permissions(Permissions::from_mode(self.file_mode))?;
        file.sync_all()?;
        drop(file); // closed before any unlink: no NFS silly-rename files
        Ok(temp)
    }

    /// Links `temp` to `dest` (create-only). Ok(true): we bound the name;
    /// Ok(false): it was already there.
    fn link_into(&self, temp: &TempFile, dest: &Path) -> io::Result<bool> {
        let mut made_parent = false;
        let mut stale_retried = false;
        loop {
            match fs::hard_link(&temp.path, dest) {
                Ok(()) => return Ok(true),
                // A retransmitted LINK reports EEXIST for our own link.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Ok(temp.link_count() == 2)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && !made_parent => {
                    made_parent = true;
                    if let Some(parent) = dest.parent() {
                        self.make_dir(parent)?;
                    }
                }
                Err(e) if is_stale(&e) && !stale_retried => stale_retried = true,
                Err(e) if temp.link_count() == 2 => {
                    debug!(
                        "shared link dest={} error={e} outcome=linked-anyway",
                        dest.display()
                    );
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Renames `temp` onto `dest` (atomic replace).
    fn rename_onto(&self, mut temp: TempFile, dest: &Path) -> io::Result<()> {
        let mut made_parent = false;
        let mut stale_retried = false;
        loop {
            match fs::rename(&temp.path, dest) {
                Ok(()) => {
                    temp.armed = false; // the name is no longer ours to unlink
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !temp.exists() {
                        // A retransmitted RENAME whose first try succeeded.
                        temp.armed = false;
                        return Ok(());
                    }
                    if made_parent {
                        return Err(e);
                    }
                    made_parent = true;
                    if let Some(parent) = dest.parent() {
                        self.make_dir(parent)?;
                    }
                }
                Err(e) if is_stale(&e) && !stale_retried => stale_retried = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads a whole file of at most `max_bytes`: None if it is not there
    /// (or stays stale after one retry).
    fn read_tolerant(&self, path: &Path, max_bytes: u64) -> TierResult<Option<Vec<u8>>> {
        for _ in 0..2 {
            match read_once(path, max_bytes) {
                Ok(bytes) => return Ok(Some(bytes)),
                Err(ReadFail::TooBig(bytes)) => {
                    return Err(TierError::Protocol(format!(
                        "{}: {bytes} bytes, over the {max_bytes} allowed",
                        path.display()
                    )))
                }
                Err(ReadFail::Io(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(ReadFail::Io(e)) if is_stale(&e) => {
                    debug!(
                        "shared read file={} error=ESTALE outcome=retry",
                        path.display()
                    );
                }
                Err(ReadFail::Io(e)) => return Err(io_error("read", path, e)),
            }
        }
        Ok(None)
    }

    fn read_raw(&self, file: &Path) -> TierResult<Raw> {
        match fs::symlink_metadata(file) {
            Ok(m) if !m.is_file() => {
                return Ok(Raw::Damaged(
                    Seen::WrongType,
                    TierError::Data(format!("{}: not a file", file.display())),
                ))
            }
            _ => {}
        }
        let bytes = match self.read_tolerant(file, RECORD_BYTES_MAX) {
            Ok(None) => return Ok(Raw::Missing),
            Ok(Some(bytes)) => bytes,
            Err(TierError::Protocol(m)) => {
                return Ok(Raw::Damaged(Seen::Oversize, TierError::Data(m)))
            }
            Err(e) => return Err(e),
        };
        Ok(match Record::decode_or_data(&bytes, &file.display()) {
            Ok(record) => Raw::Good(record),
            Err(e) => Raw::Damaged(Seen::Bytes(bytes), e),
        })
    }

    fn read_record(&self, file: &Path) -> TierResult<Option<Record>> {
        match self.read_raw(file)? {
            Raw::Missing => Ok(None),
            Raw::Good(r) => Ok(Some(r)),
            Raw::Damaged(_, e) => Err(e),
        }
    }

    /// The put itself (listing aside). A create-only put onto a damaged
    /// record replaces it (counted) and reports `Stored`.
    fn put_record_only(&self, path: &[u8], record: &Record, create_only: bool) -> TierResult<Put> {
        let dest = self.record_path(path);
        let shown = || path.escape_ascii().to_string();
        let mut damaged = None;
        if create_only {
            // The common case on a farm: another host published it first.
            // A create-only name never changes, so no temp file is needed.
            match self.read_raw(&dest)? {
                Raw::Good(existing) => {
                    debug!("shared put_record path={:?} outcome=kept-existing", shown());
                    self.touch(&dest); // a publication is a use
                    return Ok(Put::Exists(existing));
                }
                Raw::Damaged(seen, _) => damaged = Some(seen),
                Raw::Missing => {}
            }
        }
        let temp = self
            .write_temp(&record.encode())
            .map_err(|e| io_error("write temp in", &self.tmp_dir, e))?;
        if !create_only {
            self.rename_onto(temp, &dest)
                .map_err(|e| io_error("rename onto", &dest, e))?;
            debug!("shared put_record path={:?} outcome=replaced", shown());
            return Ok(Put::Stored);
        }
        for _ in 0..CREATE_ATTEMPTS_MAX {
            if let Some(seen) = damaged.take() {
                if self.swap_damaged(&temp, &dest, &seen)? {
                    self.healed.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "shared put_record path={:?} outcome=replaced-damaged-record",
                        shown()
                    );
                    return Ok(Put::Stored);
                }
            } else if self
                .link_into(&temp, &dest)
                .map_err(|e| io_error("link to", &dest, e))?
            {
                debug!("shared put_record path={:?} outcome=stored", shown());
                return Ok(Put::Stored);
            }
            match self.read_raw(&dest)? {
                Raw::Good(existing) => {
                    debug!("shared put_record path={:?} outcome=kept-existing", shown());
                    return Ok(Put::Exists(existing));
                }
                Raw::Damaged(seen, _) => damaged = Some(seen),
                // It was unlinked (evicted) between our link and our read.
                Raw::Missing => {}
            }
        }
        Err(TierError::Unavailable(format!(
            "{}: the record kept changing between link and read ({CREATE_ATTEMPTS_MAX} attempts)",
            dest.display()
        )))
    }

    /// Takes `dest` away if it is the version `seen` (one host wins the
    /// rename; what it moved is checked): the moved file, unlinked when
    /// dropped. What was not `seen` is put back (create-only: a newer one
    /// bound meanwhile wins) and None returned.
    fn take_away(&self, dest: &Path, seen: &Seen) -> TierResult<Option<TempFile>> {
        let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let moved = TempFile {
            path: self
                .tmp_dir
                .join(format!("{}{n}.heal.tmp", self.temp_prefix)),
            armed: true,
        };
        match fs::rename(dest, &moved.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("rename away", dest, e)),
        }
        let is_it = match self.read_raw(&moved.path)? {
            Raw::Damaged(s, _) => s == *seen,
            Raw::Good(r) => *seen == Seen::Bytes(r.encode()),
            Raw::Missing => false,
        };
        let is_dir = fs::symlink_metadata(&moved.path).is_ok_and(|m| m.is_dir());
        if !is_it {
            // Not ours to take (healed or replaced meanwhile): put it back.
            if is_dir {
                let _ = fs::rename(&moved.path, dest);
            } else {
                let _ = self.link_into(&moved, dest);
            }
            return Ok(None);
        }
        if is_dir {
            let _ = fs::remove_dir_all(&moved.path);
        }
        Ok(Some(moved))
    }

    /// Takes `dest` away if it is the damaged version `seen`, then binds
    /// `temp` in its place create-only. Ok(true) if we bound it.
    fn swap_damaged(&self, temp: &TempFile, dest: &Path, seen: &Seen) -> TierResult<bool> {
        if self.take_away(dest, seen)?.is_none() {
            return Ok(false);
        }
        let bound = self
            .link_into(temp, dest)
            .map_err(|e| io_error("link to", dest, e))?;
        Ok(bound)
    }

    /// Sets a file's mtime to the file server's now (`UTIME_NOW` needs only
    /// write permission, not ownership); best effort.
    fn touch(&self, file: &Path) {
        let Ok(c) = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()) else {
            return;
        };
        let now = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        };
        let times = [now, now];
        // SAFETY: a valid NUL-terminated path and two timespecs.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
        if r != 0 {
            debug!(
                "shared touch file={} error={} outcome=not-touched",
                file.display(),
                io::Error::last_os_error()
            );
        }
    }

    /// Up to `max` names of the sharded directory `top` (`<XX>/<name>`)
    /// after `cursor` (a name; empty: from the start), in order, with the
    /// cursor of the next page.
    fn scan_sharded(
        &self,
        top: &Path,
        cursor: &[u8],
        max: usize,
    ) -> TierResult<super::Page<(String, PathBuf)>> {
        let cursor = std::str::from_utf8(cursor).unwrap_or("");
        let first_shard = cursor.get(..2).unwrap_or("");
        let mut shards: Vec<String> = match fs::read_dir(top) {
            Ok(e) => e
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.len() == 2 && n.as_str() >= first_shard)
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(super::Page::default()),
            Err(e) => return Err(io_error("list", top, e)),
        };
        shards.sort();
        let mut out = Vec::new();
        for shard in shards {
            let dir = top.join(&shard);
            let mut names: Vec<String> = match fs::read_dir(&dir) {
                Ok(e) => e
                    .take(SHARD_NAMES_MAX)
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.len() == 64 && n.as_str() > cursor)
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound || is_stale(&e) => continue,
                Err(e) => return Err(io_error("list", &dir, e)),
            };
            names.sort();
            for name in names {
                if out.len() >= max.max(1) {
                    let next = out
                        .last()
                        .map(|(n, _): &(String, PathBuf)| n.clone().into_bytes());
                    return Ok(super::Page { items: out, next });
                }
                let path = dir.join(&name);
                out.push((name, path));
            }
        }
        Ok(super::Page {
            items: out,
            next: None,
        })
    }

    /// Writes the `path` file of a listing directory (create-only, best
    /// effort: a listing without one is only skipped by the sweep).
    fn write_listing_path(&self, ldir: &Path, path: &[u8]) {
        if let Ok(temp) = self.write_temp(path) {
            let _ = self.link_into(&temp, &ldir.join(LISTING_PATH_NAME));
        }
    }

    /// Sweeps one listing directory: names whose record (a file) or whose
    /// record and listing (a directory) are gone, and the directory itself
    /// once empty. The count removed.
    fn sweep_listing(&self, ldir: &Path) -> u64 {
        let Ok(Some(path)) = self.read_tolerant(&ldir.join(LISTING_PATH_NAME), RECORD_BYTES_MAX)
        else {
            return 0; // from before listings knew their path
        };
        let Ok(entries) = fs::read_dir(ldir) else {
            return 0;
        };
        let mut removed = 0;
        let mut left = 0;
        for entry in entries.take(SHARD_NAMES_MAX).flatten() {
            let fname = entry.file_name();
            let Some(listed) = parse_list_entry(fname.as_encoded_bytes()) else {
                continue;
            };
            let mut child = path.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&listed.name);
            let has_record = fs::symlink_metadata(self.record_path(&child)).is_ok();
            let has_listing =
                listed.dir && fs::symlink_metadata(self.list_dir_path(&child)).is_ok();
            if !has_record && !has_listing && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            } else {
                left += 1;
            }
        }
        if left == 0 && !path.is_empty() {
            let pfile = ldir.join(LISTING_PATH_NAME);
            let _ = fs::remove_file(&pfile);
            if fs::remove_dir(ldir).is_ok() {
                removed += 1;
            } else {
                // A publisher listed a name meanwhile: it keeps its path.
                self.write_listing_path(ldir, &path);
            }
        }
        removed
    }

    fn lease_file(&self, name: &str) -> TierResult<PathBuf> {
        if !super::valid_namespace(name) {
            return Err(TierError::Data(format!("lease name {name:?}")));
        }
        Ok(self.leases_dir.join(name))
    }
}

impl Engine for DirEngine {
    fn get_record(&self, path: &[u8]) -> TierResult<Option<Record>> {
        match self.read_record(&self.record_path(path))? {
            Some(r) => Ok(Some(r)),
            None if fs::symlink_metadata(self.list_dir_path(path)).is_ok_and(|m| m.is_dir()) => {
                Ok(Some(Record::implied_dir()))
            }
            None => Ok(None),
        }
    }

    fn put_record(&self, path: &[u8], record: &Record, create_only: bool) -> TierResult<Put> {
        let put = self.put_record_only(path, record, create_only)?;
        self.list_chain(path, record.kind == RecordKind::Dir)?;
        Ok(put)
    }

    fn has_blob(&self, id: &BlobId) -> TierResult<bool> {
        let file = self.blob_path(id);
        for _ in 0..2 {
            match fs::symlink_metadata(&file) {
                Ok(meta) => return Ok(meta.is_file()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) if is_stale(&e) => continue,
                Err(e) => return Err(io_error("stat", &file, e)),
            }
        }
        Ok(false)
    }

    fn get_blob(&self, id: &BlobId, max_bytes: u64) -> TierResult<Option<Vec<u8>>> {
        match self.read_tolerant(&self.blob_path(id), max_bytes) {
            // Over its bound: about this one blob.
            Err(TierError::Protocol(m)) => Err(TierError::Data(m)),
            other => other,
        }
    }

    fn put_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()> {
        debug_assert_eq!(
            blake3::hash(bytes).as_bytes(),
            &id.0,
            "put_blob with bytes that are not {id}"
        );
        if self.has_blob(id)? {
            self.touch(&self.blob_path(id)); // renews its grace
            return Ok(());
        }
        let dest = self.blob_path(id);
        let temp = self
            .write_temp(bytes)
            .map_err(|e| io_error("write temp in", &self.tmp_dir, e))?;
        let linked = self
            .link_into(&temp, &dest)
            .map_err(|e| io_error("link to", &dest, e))?;
        debug!(
            "shared put_blob blob={id} outcome={}",
            if linked { "stored" } else { "already-there" }
        );
        Ok(())
    }

    /// Copies the blob file to `sink` a chunk at a time.
    fn get_blob_into(
        &self,
        id: &BlobId,
        max_bytes: u64,
        sink: &mut dyn Write,
        progress: &super::Progress,
    ) -> TierResult<Option<u64>> {
        let path = self.blob_path(id);
        let mut opened = None;
        for _ in 0..2 {
            match File::open(&path) {
                Ok(f) => {
                    opened = Some(f);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) if is_stale(&e) => continue,
                Err(e) => return Err(io_error("open", &path, e)),
            }
        }
        let Some(mut file) = opened else {
            return Ok(None);
        };
        let meta = file.metadata().map_err(|e| io_error("stat", &path, e))?;
        if !meta.is_file() {
            return Err(TierError::Data(format!("{}: not a file", path.display())));
        }
        if meta.len() > max_bytes {
            return Err(TierError::Data(format!(
                "{}: {} bytes, over the {max_bytes} allowed",
                path.display(),
                meta.len()
            )));
        }
        super::copy_counted(&mut file, sink, meta.len(), progress)
            .map_err(|e| io_error("read", &path, e))?;
        Ok(Some(meta.len()))
    }

    fn put_blob_from(
        &self,
        id: &BlobId,
        source: &mut dyn Read,
        len: u64,
        progress: &super::Progress,
    ) -> TierResult<()> {
        if self.has_blob(id)? {
            self.touch(&self.blob_path(id)); // renews its grace
            return Ok(());
        }
        let dest = self.blob_path(id);
        let temp = self
            .write_temp_from(source, len, progress)
            .map_err(|e| io_error("write temp in", &self.tmp_dir, e))?;
        let linked = self
            .link_into(&temp, &dest)
            .map_err(|e| io_error("link to", &dest, e))?;
        debug!(
            "shared put_blob blob={id} outcome={}",
            if linked { "stored" } else { "already-there" }
        );
        Ok(())
    }

    fn repair_blob(&self, id: &BlobId, bytes: &[u8]) -> TierResult<()> {
        debug_assert_eq!(
            blake3::hash(bytes).as_bytes(),
            &id.0,
            "repair_blob with bytes that are not {id}"
        );
        // Blob names are content addresses: replacing damaged bytes with the
        // verified ones is the one rename over a shared name we allow.
        let dest = self.blob_path(id);
        let temp = self
            .write_temp(bytes)
            .map_err(|e| io_error("write temp in", &self.tmp_dir, e))?;
        self.rename_onto(temp, &dest)
            .map_err(|e| io_error("rename onto", &dest, e))?;
        log::info!("shared repair_blob blob={id}: damaged copy replaced");
        Ok(())
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn replace_damaged(&self, path: &[u8], seen: &Seen, record: &Record) -> TierResult<bool> {
        let dest = self.record_path(path);
        let temp = self
            .write_temp(&record.encode())
            .map_err(|e| io_error("write temp in", &self.tmp_dir, e))?;
        let done = self.swap_damaged(&temp, &dest, seen)?;
        if done {
            self.healed.fetch_add(1, Ordering::Relaxed);
            self.list_chain(path, record.kind == RecordKind::Dir)?;
            warn!(
                "shared replace_damaged path={:?} outcome=replaced",
                path.escape_ascii().to_string()
            );
        }
        Ok(done)
    }

    fn list(&self, path: &[u8], max: usize) -> TierResult<Vec<Listed>> {
        let dir = self.list_dir_path(path);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound || is_stale(&e) => return Ok(vec![]),
            Err(e) => return Err(io_error("list", &dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            if out.len() >= max {
                break;
            }
            let entry = entry.map_err(|e| io_error("list", &dir, e))?;
            if let Some(listed) = parse_list_entry(entry.file_name().as_encoded_bytes()) {
                out.push(listed);
            }
        }
        Ok(out)
    }

    fn records_healed(&self) -> u64 {
        self.healed.load(Ordering::Relaxed)
    }

    fn record_key(&self, path: &[u8]) -> Vec<u8> {
        blake3::hash(path).to_hex().as_bytes().to_vec()
    }

    fn scan_records(
        &self,
        namespace: &str,
        cursor: &[u8],
        max: usize,
    ) -> TierResult<super::Page<super::Scanned>> {
        if !super::valid_namespace(namespace) {
            return Err(TierError::Data(format!("namespace {namespace:?}")));
        }
        let top = self.root.join("ns").join(namespace).join("records");
        let super::Page { items: names, next } = self.scan_sharded(&top, cursor, max)?;
        let mut items = Vec::with_capacity(names.len());
        for (name, file) in names {
            let used_s = match fs::symlink_metadata(&file) {
                Ok(m) => m.mtime().max(0) as u64,
                Err(_) => continue, // gone since the listing: nothing to see
            };
            let (seen, record) = match self.read_raw(&file)? {
                Raw::Missing => continue,
                Raw::Good(r) => (Seen::Bytes(r.encode()), Some(r)),
                Raw::Damaged(seen, _) => (seen, None),
            };
            items.push(super::Scanned {
                key: name.into_bytes(),
                seen,
                record,
                used_s,
            });
        }
        Ok(super::Page { items, next })
    }

    fn delete_record(&self, key: &[u8], seen: &Seen) -> TierResult<bool> {
        let Some(hex) = std::str::from_utf8(key)
            .ok()
            .filter(|k| k.len() == 64 && k.bytes().all(|c| c.is_ascii_hexdigit()))
        else {
            return Err(TierError::Data(format!("record key {key:?}")));
        };
        let file = self.records_dir.join(&hex[..2]).join(hex);
        // The listing entry stays until `sweep_listings`: a listed name
        // whose record is gone is a miss.
        Ok(self.take_away(&file, seen)?.is_some())
    }

    fn scan_blobs(&self, cursor: &[u8], max: usize) -> TierResult<super::Page<super::StoredBlob>> {
        let super::Page { items: names, next } = self.scan_sharded(&self.blobs_dir, cursor, max)?;
        let items = names
            .into_iter()
            .filter_map(|(name, file)| {
                let id = BlobId::from_hex(&name)?;
                let m = fs::symlink_metadata(&file).ok()?;
                Some(super::StoredBlob {
                    id,
                    bytes: m.len(),
                    stored_s: m.mtime().max(0) as u64,
                })
            })
            .collect();
        Ok(super::Page { items, next })
    }

    fn delete_blob(&self, id: &BlobId, stored_before_s: u64) -> TierResult<bool> {
        let file = self.blob_path(id);
        match fs::symlink_metadata(&file) {
            Ok(m) if (m.mtime().max(0) as u64) < stored_before_s => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("stat", &file, e)),
        }
        match fs::remove_file(&file) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("unlink", &file, e)),
        }
    }

    fn note_used(&self, paths: &[Vec<u8>], _now_s: u64) -> TierResult<()> {
        for p in paths {
            self.touch(&self.record_path(p));
        }
        Ok(())
    }

    fn lease(&self, name: &str, holder: &str, ttl_s: u64, now_s: u64) -> TierResult<super::Lease> {
        let file = self.lease_file(name)?;
        let mine = super::encode_lease(holder, now_s + ttl_s);
        for _ in 0..LEASE_ATTEMPTS_MAX {
            let current = self.read_tolerant(&file, RECORD_BYTES_MAX);
            let current = match current {
                Err(TierError::Protocol(_)) => Some(Vec::new()), // oversize: damaged
                other => other?,
            };
            let temp = self
                .write_temp(&mine)
                .map_err(|e| io_error("write temp in", &self.tmp_dir, e))?;
            match current {
                None => {
                    if !fs::symlink_metadata(&self.leases_dir).is_ok_and(|m| m.is_dir()) {
                        self.make_dir(&self.leases_dir)
                            .map_err(|e| io_error("create", &self.leases_dir, e))?;
                    }
                    if self
                        .link_into(&temp, &file)
                        .map_err(|e| io_error("link to", &file, e))?
                    {
                        return Ok(super::Lease::Held {
                            until_s: now_s + ttl_s,
                        });
                    }
                }
                Some(bytes) => {
                    if let Some((h, until_s)) = super::decode_lease(&bytes) {
                        if h != holder && until_s > now_s {
                            return Ok(super::Lease::Other { holder: h, until_s });
                        }
                    }
                    // Ours to renew, expired, or damaged: take it over.
                    if self.take_away(&file, &Seen::Bytes(bytes))?.is_some()
                        && self
                            .link_into(&temp, &file)
                            .map_err(|e| io_error("link to", &file, e))?
                    {
                        return Ok(super::Lease::Held {
                            until_s: now_s + ttl_s,
                        });
                    }
                }
            }
        }
        // It kept changing: someone else is taking it.
        match self
            .read_tolerant(&file, RECORD_BYTES_MAX)
            .ok()
            .flatten()
            .and_then(|b| super::decode_lease(&b))
        {
            Some((holder, until_s)) => Ok(super::Lease::Other { holder, until_s }),
            None => Err(TierError::Unavailable(format!(
                "{}: the lease kept changing",
                file.display()
            ))),
        }
    }

    fn release_lease(&self, name: &str, holder: &str) -> TierResult<()> {
        let file = self.lease_file(name)?;
        if let Some(bytes) = self.read_tolerant(&file, RECORD_BYTES_MAX)? {
            if super::decode_lease(&bytes).is_some_and(|(h, _)| h == holder) {
                drop(self.take_away(&file, &Seen::Bytes(bytes))?);
            }
        }
        Ok(())
    }

    fn sweep_listings(&self, cursor: &[u8], max: usize) -> TierResult<(u64, Option<Vec<u8>>)> {
        let super::Page { items: dirs, next } = self.scan_sharded(&self.lists_dir, cursor, max)?;
        let removed = dirs.iter().map(|(_, d)| self.sweep_listing(d)).sum();
        Ok((removed, next))
    }

    fn namespaces(&self) -> TierResult<Vec<String>> {
        let top = self.root.join("ns");
        let entries = fs::read_dir(&top).map_err(|e| io_error("list", &top, e))?;
        Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| super::valid_namespace(n))
            .collect())
    }
}
