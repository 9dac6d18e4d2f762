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
//! - What a host takes from the tier is checked against local policy: a
//!   fetched file's size is its verified blob's (the tier does that), its
//!   permission bits are the record's `0777` bits less the daemon's umask
//!   (never setuid, setgid or sticky), and its mtime is never older than
//!   what this host showed for the name before it was evicted (`floors`,
//!   in memory and bounded: a restart forgets them).
//! - A create-only record that lost a race to a record whose blob is
//!   missing or fails verification, or whose size is not its blob's, does
//!   not keep it: the verified local version replaces the damaged one
//!   (compare-and-set in the engine) and it is counted.
//! - Local hits never wait on the tier. A shared mutable entry (a ccache
//!   manifest) looked up or opened more than `FRESH_MS` after it was last
//!   checked is served as it is here, and queued for a check in the
//!   background (`revalidator`: one record read on a background caller, no
//!   lock held; bounded queue `REVALIDATE_QUEUE_LEN_MAX`, one entry per
//!   inode); a newer version (by mtime) found there replaces the local one
//!   and the kernel's caches of it are invalidated, so the uses after the
//!   answer see it.
//! - `readdir` of a directory adds the names the tier lists there (at
//!   most `LIST_NAMES_MAX`, cached `LIST_TTL_MS`), with synthetic inode
//!   numbers (`LISTED_INO_BIT`): a lookup of one fetches it.
//! - Attributes without contents: a lookup of a file only the tier has
//!   reads its record alone and shows the record's size, mode (local
//!   policy applied) and mtime under an inode number allocated for it, held
//!   in memory only (`Remote`, bounded by `REMOTE_NAMES_MAX`; past it a
//!   lookup fetches the contents as before). Its blob is fetched, verified
//!   and bound under that same inode number at the first use that needs
//!   more than attributes (`materialize`: open, setattr, link, and any
//!   change to its name); a `stat` or `du` downloads nothing. A blob that
//!   is missing, fails verification or is not the record's size makes that
//!   use fail with ENOENT (the name is dropped and the kernel told), never
//!   wrong bytes. The entry lives while the kernel holds the inode.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::classes::Class;
use crate::error::{enoent, Error, Result};
use crate::fs::txn::{After, Txn};
use crate::fs::verified::Existing;
use crate::fs::DirEntry;
use crate::fs::{Attr, Caller, Core, Invalidate};
use crate::shared::tier::{Fetch, Lane, Local, Outbox, Tier, Upload};
use crate::shared::{Listed, Record, RecordKind, Seen};
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{Content, Inode, Kind, PendingUpload};

/// How long a shared mutable entry is trusted before it is revalidated
/// (like the tier's negative answers).
pub const FRESH_MS: u64 = crate::shared::tier::NEGATIVE_TTL_MS;
/// How long a directory's tier listing is reused.
pub const LIST_TTL_MS: u64 = 2_000;
/// Bounds on what `TierLocal` remembers (cleared whole when full).
const FRESH_ENTRIES_MAX: usize = 65_536;
const LIST_CACHE_DIRS_MAX: usize = 4_096;
/// Bound on the names all cached listings hold together.
const LIST_CACHE_NAMES_MAX: usize = 1 << 20;
const FLOORS_MAX: usize = 65_536;
/// Set in the inode numbers readdir gives names only the tier has (never
/// allocated to a real inode).
pub const LISTED_INO_BIT: u64 = 1 << 62;

/// When a directory was listed, and what the tier listed.
type CachedListing = (Instant, Arc<Vec<Listed>>);
/// When a directory's listing was prefetched, and what it says.
type PrefetchedDirs = (Instant, Arc<Prefetched>);

/// A prefetched listing: the directories it names. What it does not name
/// is still asked for: a listing may have lost names (an evicted set that
/// an upload wrote again), and a lost listing must hide nothing.
struct Prefetched {
    dirs: Vec<Vec<u8>>,
}
/// Directories whose prefetched listing a host keeps, how long (a
/// directory, once listed, stays: the tier never removes one), and the
/// most listings one prefetch round trip asks for (a first page of
/// `PREFETCH_NAMES_MAX` names each).
const PREFETCHED_DIRS_MAX: usize = 4_096;
const PREFETCHED_TTL_MS: u64 = 60_000;
const PREFETCH_DIRS_MAX: usize = 256;
const PREFETCH_NAMES_MAX: usize = 256;
/// Mutable entries waiting for their check against the tier.
const REVALIDATE_QUEUE_LEN_MAX: usize = 1024;
/// How often an idle revalidator looks whether the core is still there.
const REVALIDATE_POLL_MS: u64 = 1_000;
/// Names known only to the tier that the kernel holds (`Remote`).
const REMOTE_NAMES_MAX: usize = 1 << 18;

/// A file only the tier has, shown by its record (see the module doc).
#[derive(Clone)]
struct Remote {
    parent: Ino,
    name: Vec<u8>,
    /// Its path below the mount root, as the tier names it.
    path: Vec<u8>,
    /// Its class by path (a ccache entry is resolved by its header when
    /// its bytes arrive).
    class: Class,
    blob: BlobId,
    size: u64,
    /// The record's mode bits, local policy applied.
    perm: u16,
    mtime_ns: u64,
    uid: u32,
    gid: u32,
}

/// The remote names, by inode and by (directory, name).
#[derive(Default)]
struct RemoteNames {
    by_ino: HashMap<Ino, Remote>,
    by_name: HashMap<(Ino, Vec<u8>), Ino>,
}

impl RemoteNames {
    fn remove(&mut self, ino: Ino) -> Option<Remote> {
        let r = self.by_ino.remove(&ino)?;
        if self.by_name.get(&(r.parent, r.name.clone())) == Some(&ino) {
            self.by_name.remove(&(r.parent, r.name.clone()));
        }
        Some(r)
    }
}

/// What the seam remembers in memory, per mount.
#[derive(Default)]
pub struct TierLocal {
    /// Mutable inodes and when they were last checked against the tier.
    fresh: Mutex<HashMap<Ino, Instant>>,
    /// Directory path → when listed, and what the tier listed.
    listings: Mutex<HashMap<Vec<u8>, CachedListing>>,
    /// (directory, name) → the last mtime this host showed for an evicted name.
    floors: Mutex<HashMap<(Ino, Vec<u8>), u64>>,
    /// The daemon's umask, read once.
    umask: std::sync::OnceLock<u32>,
    /// Files only the tier has, shown by their records (leaf lock, held
    /// for one map operation).
    remote: Mutex<RemoteNames>,
    /// Mutable entries queued for a check against the tier (`revalidator`).
    revalidate: std::sync::OnceLock<crossbeam_channel::Sender<Ino>>,
    /// Directory path → when prefetched, and the directory names its
    /// listing's first page holds (`prefetch_below`).
    subdirs: Mutex<HashMap<Vec<u8>, PrefetchedDirs>>,
}

fn insert_bounded<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>, max: usize, k: K, v: V) {
    if m.len() >= max && !m.contains_key(&k) {
        m.clear();
    }
    m.insert(k, v);
}

/// The process umask, from /proc (reading it with umask(2) would change it
/// for an instant under other threads).
fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

impl Core {
    /// Permission bits a file fetched with `mode` gets here: never the
    /// setuid, setgid or sticky bits, and nothing the daemon's umask removes.
    pub(super) fn fetched_perm(&self, mode: u16) -> u16 {
        let umask = *self.tier_local.umask.get_or_init(process_umask);
        (u32::from(mode) & 0o777 & !umask) as u16
    }

    /// Remembers the mtime an evicted name showed (maintenance calls this).
    pub(super) fn remember_floor(&self, parent: Ino, name: &[u8], mtime_ns: u64) {
        if self.tier.get().is_none() {
            return;
        }
        let mut f = self.tier_local.floors.lock().unwrap();
        let floor = f
            .get(&(parent, name.to_vec()))
            .copied()
            .unwrap_or(0)
            .max(mtime_ns);
        insert_bounded(&mut f, FLOORS_MAX, (parent, name.to_vec()), floor);
    }

    fn floor_of(&self, parent: Ino, name: &[u8]) -> u64 {
        self.tier_local
            .floors
            .lock()
            .unwrap()
            .get(&(parent, name.to_vec()))
            .copied()
            .unwrap_or(0)
    }

    fn mark_fresh(&self, ino: Ino) {
        let mut f = self.tier_local.fresh.lock().unwrap();
        insert_bounded(&mut f, FRESH_ENTRIES_MAX, ino, Instant::now());
    }

    /// Connects the core to a shared tier (once, at mount); timestamps
    /// taken from it move the clock at most `clock_ahead_max_ns` past wall
    /// time.
    pub fn attach_tier(self: &Arc<Self>, tier: Arc<Tier>, clock_ahead_max_ns: u64) {
        self.clock.set_ahead_max_ns(clock_ahead_max_ns);
        if self.tier.set(tier).is_err() {
            warn!("shared tier attached twice; keeping the first");
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(REVALIDATE_QUEUE_LEN_MAX);
        let _ = self.tier_local.revalidate.set(tx);
        let core = Arc::downgrade(self);
        let started = std::thread::Builder::new()
            .name("tier-revalidate".into())
            .spawn(move || Core::revalidator(core, rx));
        if let Err(e) = started {
            warn!("cannot start the revalidation thread ({e}): mutable entries are not refreshed from the shared tier");
        }
    }

    /// Checks queued mutable entries against the tier, one at a time, until
    /// the core is gone.
    fn revalidator(core: std::sync::Weak<Core>, rx: crossbeam_channel::Receiver<Ino>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(REVALIDATE_POLL_MS)) {
                Ok(ino) => {
                    let Some(core) = core.upgrade() else { return };
                    let inode = match core.store.inode(ino) {
                        Ok(Some(inode)) => inode,
                        Ok(None) => continue,
                        Err(e) => {
                            warn!("revalidate ino={ino}: {e}");
                            continue;
                        }
                    };
                    if let Err(e) = core.revalidate(&inode) {
                        warn!("revalidate ino={ino}: {e}");
                    }
                    core.send_urgent_invalidations();
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if core.strong_count() == 0 {
                        return;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
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
        if !pending.create_only {
            self.mark_fresh(inode.ino);
        }
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
        let mut fetched = match self.new_fetched() {
            Ok(f) => f,
            Err(e) => {
                warn!("converge {:?}: {e}", String::from_utf8_lossy(path));
                return;
            }
        };
        let why = match tier.blob_into(Lane::Background, blob, size, &fetched.file) {
            Fetch::Got(_) => None,
            // The winner is damaged: its blob is missing, fails
            // verification, or is not the size it claims.
            Fetch::Missing | Fetch::Corrupt => Some("its blob is missing or corrupt".to_string()),
            Fetch::WrongSize(len) => Some(format!("it claims {size} bytes, its blob has {len}")),
            Fetch::Failed(e) => {
                warn!(
                    "converge {:?}: cannot fetch the winner's blob {blob} ({e}); keeping ours for now",
                    String::from_utf8_lossy(path)
                );
                return;
            }
        };
        if let Some(why) = why {
            self.replace_damaged_winner(tier, path, &winner, &why);
            return;
        }
        // Create-only keeps the first *valid* content: a winner that fails
        // its own checksum does not replace ours (which may be the valid
        // recompile that healed it here), and once ours passes that
        // checksum it replaces the winner in the tier (compare-and-set, as
        // for damaged records; counted in shared_records_healed), so every
        // later host gets the valid one instead of recompiling.
        if crate::integrity::check_file(&fetched.file)
            .is_ok_and(|v| v == crate::integrity::Verdict::Corrupt)
        {
            if self.local_result_is_valid(path) {
                self.replace_damaged_winner(
                    tier,
                    path,
                    &winner,
                    "its result fails its own format's checksum",
                );
            } else {
                warn!(
                    "converge {:?}: the shared tier's result {blob} fails its own checksum; keeping ours",
                    String::from_utf8_lossy(path)
                );
            }
            return;
        }
        let result = (|| -> Result<()> {
            let Some((parent, name, ino)) = self.resolve_path(path)? else {
                return Ok(());
            };
            fetched.existing = self.check_existing(&blob)?;
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
            self.install_fetched(&mut txn, &fetched, blob, size)?;
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

    /// True if this host's result at `path` passes its own format's
    /// checksum (a definite `Valid`: a format that cannot be judged does
    /// not replace anything).
    fn local_result_is_valid(&self, path: &[u8]) -> bool {
        let valid = || -> Result<bool> {
            let Some((_, _, ino)) = self.resolve_path(path)? else {
                return Ok(false);
            };
            let Some(inode) = self.store.inode(ino)? else {
                return Ok(false);
            };
            let Content::Blob(id) = inode.content else {
                return Ok(false);
            };
            let file = self.open_blob(&id)?;
            Ok(crate::integrity::check_file(&file)
                .is_ok_and(|v| v == crate::integrity::Verdict::Valid))
        };
        valid().unwrap_or(false)
    }

    /// Replaces a damaged winner of a create-only race with this host's
    /// verified version of `path` (called on an upload thread).
    fn replace_damaged_winner(&self, tier: &Tier, path: &[u8], winner: &Record, why: &str) {
        let shown = String::from_utf8_lossy(path).into_owned();
        let ours = (|| -> Result<Option<Record>> {
            let Some((_, _, ino)) = self.resolve_path(path)? else {
                return Ok(None);
            };
            let Some(inode) = self.store.inode(ino)? else {
                return Ok(None);
            };
            let Content::Blob(id) = inode.content else {
                return Ok(None);
            };
            Ok(Some(Record {
                kind: RecordKind::File {
                    blob: id,
                    size: inode.size,
                    mode: inode.perm,
                },
                mtime_ns: inode.mtime_ns,
            }))
        })();
        let ours = match ours {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                warn!("heal {shown:?}: {e}");
                return;
            }
        };
        match tier.replace_damaged(path, Seen::Bytes(winner.encode()), ours) {
            Ok(true) => info!(
                "heal {shown:?}: the shared record was damaged ({why}); replaced by this host's verified version"
            ),
            Ok(false) => debug!("heal {shown:?}: the damaged record changed meanwhile; left as is"),
            Err(e) => warn!("heal {shown:?}: the shared record is damaged ({why}) but could not be replaced: {e}"),
        }
    }

    /// Adds to `entries` (the listing of directory `dir`) the names the
    /// tier lists there that are not here yet.
    pub(super) fn list_shared(&self, dir: Ino, entries: &mut Vec<DirEntry>) -> Result<()> {
        let Some(tier) = self.tier.get() else {
            return Ok(());
        };
        let inode = self.inode(dir)?;
        let path = if dir == Ino::ROOT {
            Vec::new()
        } else {
            self.path_of(inode.parent, &inode.name)?.join(&b'/')
        };
        let cached = {
            let l = self.tier_local.listings.lock().unwrap();
            l.get(&path)
                .filter(|(at, _)| at.elapsed() < Duration::from_millis(LIST_TTL_MS))
                .map(|(_, names)| names.clone())
        };
        let listed = match cached {
            Some(names) => names,
            None => {
                let names = match tier.list(&path) {
                    Ok(names) => Arc::new(names),
                    Err(e) => {
                        debug!(
                            "list dir={:?} from the shared tier: {e}",
                            String::from_utf8_lossy(&path)
                        );
                        Arc::new(Vec::new())
                    }
                };
                let mut l = self.tier_local.listings.lock().unwrap();
                let cached: usize = l.values().map(|(_, n)| n.len()).sum();
                if cached + names.len() > LIST_CACHE_NAMES_MAX {
                    l.clear();
                }
                insert_bounded(
                    &mut l,
                    LIST_CACHE_DIRS_MAX,
                    path.clone(),
                    (Instant::now(), names.clone()),
                );
                names
            }
        };
        let here: std::collections::HashSet<&[u8]> =
            entries.iter().map(|e| e.name.as_slice()).collect();
        let mut added = Vec::new();
        let mut prefix = if dir == Ino::ROOT {
            Vec::new()
        } else {
            self.path_of(inode.parent, &inode.name)?
        };
        for l in listed.iter() {
            if here.contains(l.name.as_slice())
                || crate::fs::check_name(&l.name).is_err()
                || added.iter().any(|e: &DirEntry| e.name == l.name)
            {
                continue;
            }
            prefix.push(l.name.clone());
            let refs: Vec<&[u8]> = prefix.iter().map(Vec::as_slice).collect();
            let local = !l.dir && self.config.rules.classify(&refs) == Class::Local;
            prefix.pop();
            if local {
                continue;
            }
            let h = blake3::hash(&[path.as_slice(), b"/", &l.name].concat());
            let n = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap());
            added.push(DirEntry {
                ino: Ino(LISTED_INO_BIT | (n & (LISTED_INO_BIT - 1))),
                kind: if l.dir { Kind::Dir } else { Kind::File },
                name: l.name.clone(),
            });
        }
        tier.stats
            .names_listed
            .fetch_add(added.len() as u64, std::sync::atomic::Ordering::Relaxed);
        entries.extend(added);
        Ok(())
    }

    /// The attributes of a local entry, served now; a shared mutable one
    /// last checked more than `FRESH_MS` ago is queued for a check in the
    /// background (never waited on). Called with no lock held.
    pub(super) fn refresh_shared(&self, inode: Inode) -> Result<Attr> {
        self.schedule_revalidation(&inode);
        Ok(self.attr_of(&inode))
    }

    /// Queues `inode` for a check against the tier if it is a shared
    /// mutable entry due for one (at most once per `FRESH_MS`; skipped if
    /// the queue is full: the next use after the bound queues it again).
    fn schedule_revalidation(&self, inode: &Inode) {
        if self.tier.get().is_none()
            || inode.kind != Kind::File
            || inode.class != Class::Mutable
            || inode.nlink == 0
            || !matches!(inode.content, Content::Blob(_))
        {
            return;
        }
        {
            let mut f = self.tier_local.fresh.lock().unwrap();
            if f.get(&inode.ino)
                .is_some_and(|t| t.elapsed() < Duration::from_millis(FRESH_MS))
            {
                return;
            }
            insert_bounded(&mut f, FRESH_ENTRIES_MAX, inode.ino, Instant::now());
        }
        if let Some(tx) = self.tier_local.revalidate.get() {
            let _ = tx.try_send(inode.ino);
        }
    }

    /// Like `refresh_shared`, by inode number (open); also reports the
    /// use of a shared entry (`report_use`).
    pub(super) fn refresh_shared_ino(&self, ino: Ino) {
        let Some(tier) = self.tier.get() else {
            return;
        };
        if let Ok(Some(inode)) = self.store.inode(ino) {
            self.report_use(tier, &inode);
            let _ = self.refresh_shared(inode);
        }
    }

    /// Tells the tier's collector that a shared entry is in use here
    /// (hits are local: the engine never sees them otherwise): at most once
    /// per report interval per inode, batched by the tier; the engine
    /// ignores names it holds no record of.
    fn report_use(&self, tier: &Tier, inode: &Inode) {
        if inode.kind != Kind::File
            || inode.class == Class::Local
            || !matches!(inode.content, Content::Blob(_))
            || !tier.use_due(inode.ino.0)
        {
            return;
        }
        if let Ok(parts) = self.path_of(inode.parent, &inode.name) {
            tier.note_use(parts.join(&b'/'));
        }
    }

    fn revalidate(&self, inode: &Inode) -> Result<Option<Inode>> {
        let Some(tier) = self.tier.get() else {
            return Ok(None);
        };
        let Content::Blob(local_blob) = inode.content else {
            return Ok(None);
        };
        if inode.kind != Kind::File || inode.class != Class::Mutable || inode.nlink == 0 {
            return Ok(None);
        }
        let path = self.path_of(inode.parent, &inode.name)?.join(&b'/');
        tier.stats
            .revalidations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(Some(record)) = tier.record(Lane::Background, &path) else {
            return Ok(None);
        };
        let RecordKind::File { blob, size, mode } = record.kind else {
            return Ok(None);
        };
        if blob == local_blob || record.mtime_ns <= inode.mtime_ns {
            return Ok(None);
        }
        let Some((fetched, _)) = self.fetch_staged(tier, Lane::Background, &path, blob, size)?
        else {
            return Ok(None);
        };
        self.clock.observe(record.mtime_ns);
        let _g = self.lock(&[inode.parent, inode.ino]);
        let Some(mut cur) = self.store.inode(inode.ino)? else {
            return Ok(None);
        };
        if cur.content != Content::Blob(local_blob)
            || cur.mtime_ns >= record.mtime_ns
            || self.usage.writers(cur.ino) > 0
        {
            // Changed here meanwhile, or being written: the local version stands.
            return Ok(None);
        }
        let mut txn = self.txn();
        self.lock_blobs(&mut txn, &[blob, local_blob]);
        self.install_fetched(&mut txn, &fetched, blob, size)?;
        self.drop_ref(&mut txn, local_blob, cur.ino, cur.size)?;
        self.add_ref(&mut txn, blob, cur.ino, size);
        cur.content = Content::Blob(blob);
        cur.size = size;
        cur.perm = self.fetched_perm(mode);
        cur.mtime_ns = record.mtime_ns;
        cur.ctime_ns = self.now();
        txn.batch.put_inode(&cur);
        txn.after
            .push(After::InvalidateNow(Invalidate::Data(cur.ino)));
        txn.after.push(After::Invalidate(Invalidate::Entry(
            cur.parent,
            cur.name.clone(),
        )));
        self.commit(txn)?;
        drop(_g);
        self.send_urgent_invalidations();
        tier.stats
            .refreshed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(
            "refresh name={:?} ino={} blob={blob} from the shared tier",
            String::from_utf8_lossy(&cur.name),
            cur.ino
        );
        Ok(Some(cur))
    }

    /// Fetches blob `id` (which the record of `path` says has `size`
    /// bytes) into a new staging file, verified as it arrives, with no lock
    /// held; `install_fetched` links it into place. A file of blob `id`
    /// already stored is checked now, with no lock held, as a
    /// publication's would be (`check_existing`). Also returns the first
    /// bytes (for header-decided classes). None if it could not be had
    /// whole and verified (the tier counted and logged why).
    fn fetch_staged(
        &self,
        tier: &Tier,
        lane: Lane,
        path: &[u8],
        id: BlobId,
        size: u64,
    ) -> Result<Option<(Fetched, [u8; 4])>> {
        let mut fetched = self.new_fetched()?;
        if !tier.fetch_contents_into(lane, path, id, size, &fetched.file) {
            return Ok(None);
        }
        let mut head = [0u8; 4];
        let n = fetched
            .file
            .read_at(&mut head, 0)
            .map_err(|e| Error::io(e, "read fetched blob"))?;
        head[n..].fill(0);
        fetched.existing = self.check_existing(&id)?;
        Ok(Some((fetched, head)))
    }

    /// A new, empty staging file for a blob being fetched.
    fn new_fetched(&self) -> Result<Fetched> {
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
        Ok(Fetched {
            path,
            file,
            existing: Existing::Absent,
        })
    }

    /// Records a fetched blob (its stripe held), linking its file in place
    /// (not fsynced: see `Blobs::install_as`), or replacing a damaged one.
    fn install_fetched(&self, txn: &mut Txn, f: &Fetched, id: BlobId, size: u64) -> Result<()> {
        self.settle_blob_file(txn, &id, &f.path, &f.file, false, f.existing)?;
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
        if let Some(attr) = self.remote_again(parent, name) {
            return Ok(Some(attr));
        }
        let path = parts.join(&b'/');
        let parent_path = parts[..parts.len() - 1].join(&b'/');
        let mut record = if self.listed_as_dir(&parent_path, name) {
            // A prefetched listing names it: a directory, no round trip.
            tier.stats
                .dirs_prefetched
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Record::implied_dir()
        } else {
            match tier.fetch_record(&path) {
                Some(r) => r,
                None => return Ok(None),
            }
        };
        if let RecordKind::File { blob, size, mode } = record.kind {
            let room = self.tier_local.remote.lock().unwrap().by_ino.len() < REMOTE_NAMES_MAX;
            if room {
                record.mtime_ns = self.clock.observe(record.mtime_ns);
                return self.show_remote(
                    parent,
                    name,
                    path,
                    class,
                    blob,
                    size,
                    mode,
                    record.mtime_ns,
                );
            }
        }
        let fetched = match &record.kind {
            RecordKind::Dir => None,
            RecordKind::File { blob, size, .. } => {
                match self.fetch_staged(tier, Lane::Request, &path, *blob, *size)? {
                    Some(f) => Some(f),
                    None => return Ok(None),
                }
            }
        };
        // A record from a host whose clock runs fast is shown no further
        // ahead than the clock may move (see `Clock::observe`).
        record.mtime_ns = self.clock.observe(record.mtime_ns);
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
        let inode = match (&record.kind, &fetched) {
            (RecordKind::Dir, _) => {
                let perm = dir.perm & 0o7777;
                let mut d =
                    self.new_inode(ino, Kind::Dir, Class::Local, perm, owner, &dir, name, now);
                // An implied directory (its record was lost) has mtime 0.
                if record.mtime_ns > 0 {
                    d.mtime_ns = record.mtime_ns.min(now);
                }
                d
            }
            (RecordKind::File { blob, mode, size }, Some((f, head))) => {
                // The size is the verified blob's (the tier refused a
                // record that disagrees).
                let size = *size;
                self.lock_blobs(&mut txn, &[*blob]);
                self.install_fetched(&mut txn, f, *blob, size)?;
                let class = class.resolve(&head[..(size as usize).min(4)]);
                let perm = self.fetched_perm(*mode);
                let mut f = self.new_inode(ino, Kind::File, class, perm, owner, &dir, name, now);
                f.content = Content::Blob(*blob);
                f.size = size;
                f.mtime_ns = record.mtime_ns.max(self.floor_of(parent, name));
                self.add_ref(&mut txn, *blob, ino, size);
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
        if inode.class == Class::Mutable {
            self.mark_fresh(ino);
        }
        debug!(
            "fetch name={:?} ino={ino} from the shared tier",
            String::from_utf8_lossy(name)
        );
        if inode.kind == Kind::Dir {
            self.prefetch_below(tier, &path);
        }
        Ok(Some(self.attr_of(&inode)))
    }
}

/// Fetched bytes in a temporary file, removed when dropped.
struct Fetched {
    path: std::path::PathBuf,
    file: std::fs::File,
    /// What the check of a local file of the same blob found.
    existing: Existing,
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

/// Fresh-host walks: a directory found in the tier brings the listings of
/// the two levels below it, each level in one round trip (engines that
/// pipeline: `Tier::prefetches`), so the lookups of the directories below
/// need none. A walk of ccache's `cc/X/Y` tree costs the record of `cc`
/// and three listing round trips, instead of one round trip per directory.
/// What a prefetched listing does not name is still asked for.
impl Core {
    fn prefetched(&self, path: &[u8]) -> Option<Arc<Prefetched>> {
        let s = self.tier_local.subdirs.lock().unwrap();
        s.get(path)
            .filter(|(at, _)| at.elapsed() < Duration::from_millis(PREFETCHED_TTL_MS))
            .map(|(_, p)| p.clone())
    }

    /// True if the prefetched listing of `parent_path` names `name` as a
    /// directory.
    fn listed_as_dir(&self, parent_path: &[u8], name: &[u8]) -> bool {
        self.prefetched(parent_path)
            .is_some_and(|p| p.dirs.iter().any(|n| n == name))
    }

    /// Makes sure the listings of `path` and of the two levels of
    /// directories below it are prefetched (at most one round trip per
    /// level, each of at most `PREFETCH_DIRS_MAX` listings).
    fn prefetch_below(&self, tier: &Tier, path: &[u8]) {
        if !tier.prefetches() {
            return;
        }
        let mut level = vec![path.to_vec()];
        for _ in 0..3 {
            let missing: Vec<Vec<u8>> = level
                .iter()
                .filter(|p| self.prefetched(p).is_none())
                .take(PREFETCH_DIRS_MAX)
                .cloned()
                .collect();
            if !missing.is_empty() {
                match tier.list_many(missing.clone(), PREFETCH_NAMES_MAX) {
                    Ok(listings) => {
                        let mut s = self.tier_local.subdirs.lock().unwrap();
                        for (p, listing) in missing.into_iter().zip(listings) {
                            let dirs: Vec<Vec<u8>> = listing
                                .names
                                .into_iter()
                                .filter(|l| l.dir && crate::fs::check_name(&l.name).is_ok())
                                .map(|l| l.name)
                                .collect();
                            insert_bounded(
                                &mut s,
                                PREFETCHED_DIRS_MAX,
                                p,
                                (Instant::now(), Arc::new(Prefetched { dirs })),
                            );
                        }
                    }
                    Err(e) => {
                        debug!("prefetch below {:?}: {e}", String::from_utf8_lossy(path));
                        return;
                    }
                }
            }
            let mut next = Vec::new();
            for p in &level {
                for name in self.prefetched(p).iter().flat_map(|n| n.dirs.iter()) {
                    if next.len() >= PREFETCH_DIRS_MAX {
                        break;
                    }
                    let child = if p.is_empty() {
                        name.clone()
                    } else {
                        [p.as_slice(), b"/", name].concat()
                    };
                    next.push(child);
                }
            }
            if next.is_empty() {
                return;
            }
            level = next;
        }
    }
}

/// Files only the tier has: shown by their records, fetched at first use
/// (see the module doc).
impl Core {
    fn remote_attr(r: &Remote, ino: Ino) -> Attr {
        Attr {
            ino,
            kind: Kind::File,
            perm: r.perm,
            uid: r.uid,
            gid: r.gid,
            nlink: 1,
            size: r.size,
            mtime_ns: r.mtime_ns,
            atime_ns: r.mtime_ns,
            ctime_ns: r.mtime_ns,
            cacheable: true,
            rdev: 0,
        }
    }

    /// A name already shown from its record: counts the kernel's new
    /// reference (under the directory's stripe, shared, like a lookup of a
    /// local name).
    fn remote_again(&self, parent: Ino, name: &[u8]) -> Option<Attr> {
        let _shared = self.inode_locks.read(parent, &self.stats.lock_wait);
        let remote = self.tier_local.remote.lock().unwrap();
        let ino = *remote.by_name.get(&(parent, name.to_vec()))?;
        let attr = Self::remote_attr(&remote.by_ino[&ino], ino);
        drop(remote);
        self.usage.remember(ino);
        Some(attr)
    }

    /// Shows a file only the tier has by its record, under a new inode
    /// number; counts the kernel's reference.
    #[allow(clippy::too_many_arguments)]
    fn show_remote(
        &self,
        parent: Ino,
        name: &[u8],
        path: Vec<u8>,
        class: Class,
        blob: BlobId,
        size: u64,
        mode: u16,
        mtime_ns: u64,
    ) -> Result<Option<Attr>> {
        let dir = self.inode(parent)?;
        let ino = self.alloc_ino()?;
        let _shared = self.inode_locks.read(parent, &self.stats.lock_wait);
        if let Some(existing) = self.store.dentry(parent, name)? {
            // Bound here meanwhile: the local name wins.
            let Some(inode) = self.store.inode(existing)? else {
                return Ok(None);
            };
            self.usage.remember(existing);
            return Ok(Some(self.attr_of(&inode)));
        }
        let mut remote = self.tier_local.remote.lock().unwrap();
        let key = (parent, name.to_vec());
        if let Some(&other) = remote.by_name.get(&key) {
            // Another lookup showed it meanwhile.
            let attr = Self::remote_attr(&remote.by_ino[&other], other);
            drop(remote);
            self.usage.remember(other);
            return Ok(Some(attr));
        }
        let r = Remote {
            parent,
            name: name.to_vec(),
            path,
            class,
            blob,
            size,
            perm: self.fetched_perm(mode),
            mtime_ns: mtime_ns.max(self.floor_of(parent, name)),
            uid: dir.uid,
            gid: dir.gid,
        };
        let attr = Self::remote_attr(&r, ino);
        remote.by_ino.insert(ino, r);
        remote.by_name.insert(key, ino);
        drop(remote);
        self.usage.remember(ino);
        debug!(
            "show name={:?} ino={ino} from its shared record (contents fetched at open)",
            String::from_utf8_lossy(name)
        );
        Ok(Some(attr))
    }

    /// The attributes of an inode shown from its record only.
    pub(super) fn remote_getattr(&self, ino: Ino) -> Option<Attr> {
        let remote = self.tier_local.remote.lock().unwrap();
        remote.by_ino.get(&ino).map(|r| Self::remote_attr(r, ino))
    }

    /// An unlink of a name shown from its shared record only: the name is
    /// dropped here (the tier keeps it, as it keeps every name a host
    /// deletes). True if it was one.
    pub(super) fn unshow_remote_name(&self, parent: Ino, name: &[u8]) -> bool {
        if self.tier.get().is_none() {
            return false;
        }
        let mut remote = self.tier_local.remote.lock().unwrap();
        match remote.by_name.get(&(parent, name.to_vec())).copied() {
            Some(ino) => remote.remove(ino).is_some(),
            None => false,
        }
    }

    /// The kernel forgot an inode: a remote one is dropped.
    pub(super) fn forget_remote(&self, ino: Ino) {
        if self.tier.get().is_some() {
            self.tier_local.remote.lock().unwrap().remove(ino);
        }
    }

    /// Before a change to the name `name` in `parent`: if it is shown
    /// from its record only, its contents are fetched and bound first, so
    /// the change meets the name as a lookup used to bind it. A fetch that
    /// fails leaves the name absent here.
    pub(super) fn materialize_name(&self, parent: Ino, name: &[u8]) {
        if self.tier.get().is_none() {
            return;
        }
        let ino = {
            let remote = self.tier_local.remote.lock().unwrap();
            remote.by_name.get(&(parent, name.to_vec())).copied()
        };
        if let Some(ino) = ino {
            if let Err(e) = self.materialize(ino) {
                debug!("materialize ino={ino} before a change to its name: {e}");
            }
        }
    }

    /// Fetches, verifies and binds the contents of an inode shown from its
    /// record only, under the same inode number (a no-op for any other
    /// inode). Called with no lock held; the network call holds none.
    pub(super) fn materialize(&self, ino: Ino) -> Result<()> {
        let Some(tier) = self.tier.get() else {
            return Ok(());
        };
        let Some(r) = self
            .tier_local
            .remote
            .lock()
            .unwrap()
            .by_ino
            .get(&ino)
            .cloned()
        else {
            return Ok(());
        };
        let dropped = |why: &str| -> Result<()> {
            self.tier_local.remote.lock().unwrap().remove(ino);
            if let Some(k) = self.kernel.get() {
                k.invalidate_later(Invalidate::Entry(r.parent, r.name.clone()));
            }
            debug!(
                "materialize name={:?} ino={ino}: {why}; the name is dropped here",
                String::from_utf8_lossy(&r.name)
            );
            enoent()
        };
        let Some((fetched, head)) =
            self.fetch_staged(tier, Lane::Request, &r.path, r.blob, r.size)?
        else {
            return dropped("its contents could not be fetched");
        };
        let _g = self.lock(&[r.parent]);
        match self.store.dentry(r.parent, &r.name)? {
            Some(bound) if bound == ino => return Ok(()), // another open did it
            Some(_) => return dropped("the name was bound here meanwhile"),
            None => {}
        }
        if !self
            .tier_local
            .remote
            .lock()
            .unwrap()
            .by_ino
            .contains_key(&ino)
        {
            return dropped("it was forgotten meanwhile");
        }
        let dir = self.inode(r.parent)?;
        let mut txn = self.txn();
        let now = self.now();
        let owner = Caller {
            uid: r.uid,
            gid: r.gid,
        };
        let size = r.size;
        self.lock_blobs(&mut txn, &[r.blob]);
        self.install_fetched(&mut txn, &fetched, r.blob, size)?;
        let class = r.class.resolve(&head[..(size as usize).min(4)]);
        let mut f = self.new_inode(ino, Kind::File, class, r.perm, owner, &dir, &r.name, now);
        f.content = Content::Blob(r.blob);
        f.size = size;
        f.mtime_ns = r.mtime_ns;
        self.add_ref(&mut txn, r.blob, ino, size);
        txn.batch.put_inode(&f);
        txn.batch.put_dentry(r.parent, &r.name, ino);
        self.commit(txn)?;
        self.tier_local.remote.lock().unwrap().remove(ino);
        if class == Class::Mutable {
            self.mark_fresh(ino);
        }
        debug!(
            "fetch name={:?} ino={ino} blob={} from the shared tier",
            String::from_utf8_lossy(&r.name),
            r.blob
        );
        Ok(())
    }
}
