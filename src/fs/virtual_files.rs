//! The read-only statistics directory `.casfs/` at the mount root: its
//! names, attributes and rendered contents.
//!
//! Invariant: `.casfs` exists only at the root, and nothing in it can be
//! changed but its owner; its files are rendered at open, so a reader sees
//! one snapshot.
//!
//! Owner: `.casfs` and its files have one owner, the mount root's until a
//! chown of any of them sets it (kept in memory: a remount starts from the
//! root's again). So `chown -R builder /var/cache/ccache` of a mount
//! succeeds and leaves every entry owned as asked; modes, sizes and times
//! of `.casfs` entries cannot be set (EROFS).
//! Rendering never waits on the network: it answers from counters.
//!
//! `casfs sync` is a short-poll protocol, so no FUSE worker ever waits for
//! uploads and the client can be interrupted at any moment (a FUSE request
//! that a daemon is answering cannot be: its caller sits in state D):
//! reading `.casfs/sync` answers at once, `ok: ...` or `FAILED: ...` when
//! that is already known, else `pending: N uploads; poll sync-MARK`, where
//! MARK is the clock tick every publication acknowledged before the read
//! is below. Reading `.casfs/sync-MARK` (looked up by name, never listed)
//! answers at once the same way for that mark. The client sleeps between
//! reads; Ctrl-C or `timeout` ends it in its sleep or in a read that does
//! not block.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{enoent, Error, Result};
use crate::fs::SetAttr;
use crate::fs::{Attr, Core, DirEntry};
use crate::shared::tier::SyncState;
use crate::stats::{Extra, Snapshot};
use crate::store::ids::Ino;
use crate::store::meta::Kind;

/// The owner of `.casfs` once a chown set it: `uid << 32 | gid`, or
/// `UNSET` (the mount root's owner).
pub struct VirtualOwner(AtomicU64);

const UNSET: u64 = u64::MAX;

impl Default for VirtualOwner {
    fn default() -> Self {
        VirtualOwner(AtomicU64::new(UNSET))
    }
}

/// The statistics directory's name at the mount root.
pub const STATS_DIR_NAME: &[u8] = b".casfs";
const STATS_FILES: [(&[u8], Ino); 4] = [
    (b"sync", Ino::STATS_SYNC),
    (b"stats", Ino::STATS_TEXT),
    (b"stats.json", Ino::STATS_JSON),
    (b"metrics", Ino::STATS_METRICS),
];
/// The name prefix of the files that report on one sync (`sync-MARK`).
pub const SYNC_MARK_PREFIX: &str = "sync-";

impl Core {
    pub(super) fn is_stats_name(parent: Ino, name: &[u8]) -> bool {
        parent == Ino::ROOT && name == STATS_DIR_NAME
    }

    /// The answer to a lookup of a virtual name, if it is one.
    pub(super) fn lookup_virtual(&self, parent: Ino, name: &[u8]) -> Option<Result<Attr>> {
        if Self::is_stats_name(parent, name) {
            return Some(Ok(self.virtual_attr(Ino::STATS_DIR)));
        }
        if parent == Ino::STATS_DIR {
            if let Some(ino) = sync_mark_file(name) {
                return Some(Ok(self.virtual_attr(ino)));
            }
            return Some(match STATS_FILES.iter().find(|(n, _)| *n == name) {
                Some((_, ino)) => Ok(self.virtual_attr(*ino)),
                None => enoent(),
            });
        }
        None
    }

    pub(super) fn list_virtual(&self, entries: &mut Vec<DirEntry>) {
        for (name, i) in STATS_FILES {
            entries.push(DirEntry {
                ino: i,
                kind: Kind::File,
                name: name.to_vec(),
            });
        }
    }

    pub(super) fn list_virtual_root(&self, entries: &mut Vec<DirEntry>) {
        entries.push(DirEntry {
            ino: Ino::STATS_DIR,
            kind: Kind::Dir,
            name: STATS_DIR_NAME.to_vec(),
        });
    }

    /// The owner of `.casfs` and its files (see the module doc).
    fn virtual_owner(&self) -> (u32, u32) {
        match self.virtual_owner.0.load(Ordering::Relaxed) {
            UNSET => self
                .store
                .inode(Ino::ROOT)
                .ok()
                .flatten()
                .map_or((0, 0), |r| (r.uid, r.gid)),
            both => ((both >> 32) as u32, both as u32),
        }
    }

    /// A setattr of a `.casfs` entry: a chown sets the owner of them all
    /// (the caller's permission was checked as for any file); anything
    /// else is refused.
    pub(super) fn setattr_virtual(&self, ino: Ino, set: &SetAttr) -> Result<Attr> {
        let only_owner =
            set.mode.is_none() && set.size.is_none() && set.atime.is_none() && set.mtime.is_none();
        if !only_owner {
            return Err(Error::errno(libc::EROFS));
        }
        let (uid, gid) = self.virtual_owner();
        let (uid, gid) = (set.uid.unwrap_or(uid), set.gid.unwrap_or(gid));
        self.virtual_owner
            .0
            .store(u64::from(uid) << 32 | u64::from(gid), Ordering::Relaxed);
        Ok(self.virtual_attr(ino))
    }

    pub(super) fn virtual_attr(&self, ino: Ino) -> Attr {
        let (kind, perm, size) = if ino == Ino::STATS_DIR {
            (Kind::Dir, 0o555, 0)
        } else if ino == Ino::STATS_SYNC || ino.sync_mark().is_some() {
            (Kind::File, 0o444, 0)
        } else {
            (Kind::File, 0o444, self.render(ino).len() as u64)
        };
        let t = self.clock.last_ns();
        let (uid, gid) = self.virtual_owner();
        Attr {
            ino,
            kind,
            perm,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size,
            mtime_ns: t,
            atime_ns: t,
            ctime_ns: t,
            cacheable: false,
            rdev: 0,
        }
    }

    /// The state of the sync waiting for `mark` (None: a new sync, from
    /// now), at once (see the module doc).
    fn render_sync(&self, mark: Option<u64>) -> String {
        let Some(t) = self.tier.get() else {
            return "ok: no shared tier\n".to_string();
        };
        let mark = match mark.map_or_else(|| t.sync_mark(), Ok) {
            Ok(m) => m,
            Err(e) => return format!("FAILED: {e}\n"),
        };
        match t.sync_state(mark) {
            SyncState::Done(n) => format!("ok: {n} uploads delivered to {}\n", t.describe()),
            SyncState::Failed(e) => format!("FAILED: {e}\n"),
            SyncState::Waiting(n) => match Ino::of_sync_mark(mark) {
                Some(_) => format!("pending: {n} uploads; poll {SYNC_MARK_PREFIX}{mark}\n"),
                None => format!("FAILED: the clock tick {mark} cannot be named\n"),
            },
        }
    }

    pub(super) fn render(&self, ino: Ino) -> Vec<u8> {
        if ino == Ino::STATS_SYNC {
            return self.render_sync(None).into_bytes();
        }
        if let Some(mark) = ino.sync_mark() {
            return self.render_sync(Some(mark)).into_bytes();
        }
        let mut snap = Snapshot {
            gauges: self.gauges.get(),
            ..Default::default()
        };
        snap.extras.push(Extra {
            name: "touches_pending",
            help: "Touches (utimensat of published files) remembered and not yet written to the metadata",
            value: self.store.touches.len() as u64,
            gauge: true,
        });
        snap.histograms.push((
            "lock_wait",
            "Time spent waiting for a contended inode or blob lock",
            &self.stats.lock_wait,
        ));
        if let Some(t) = self.tier.get() {
            t.snapshot(&mut snap);
            let refusal = t.stats.last_refusal.lock().unwrap().clone();
            if !refusal.is_empty() {
                snap.notes.push(("shared_last_refusal", refusal));
            }
            snap.extras.push(Extra {
                name: "shared_clock_ahead",
                help: "Timestamps from the shared tier further ahead of this host's clock than --shared-clock-skew-ms (taken as the bound)",
                value: self.clock.ahead_count(),
                gauge: false,
            });
        }
        match ino {
            Ino::STATS_TEXT => self.stats.render_text(&snap),
            Ino::STATS_JSON => self.stats.render_json(&snap),
            _ => self.stats.render_prometheus(&snap),
        }
        .into_bytes()
    }
}

/// The virtual file a `.casfs/sync-MARK` name stands for (canonical
/// decimal only, so one mark has one name).
fn sync_mark_file(name: &[u8]) -> Option<Ino> {
    let digits = std::str::from_utf8(name)
        .ok()?
        .strip_prefix(SYNC_MARK_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    Ino::of_sync_mark(digits.parse().ok()?)
}
