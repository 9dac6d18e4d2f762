//! Touches not yet written: the times of inodes whose record in the
//! database is older than what clients were told.
//!
//! ccache touches its manifest and its result on every hit (`utimensat`,
//! its LRU mark). Writing each touch as a RocksDB write costs a log append
//! and a memtable insert on the request path; instead a touch of a
//! published file is kept here and written in batches (`Core::write_touches`,
//! from the background, before an eviction pass and at unmount).
//!
//! Rules (kept by the callers named):
//! - Every read of an inode record through `Store::inode` applies the
//!   pending times, so a client reads the time it set at once.
//! - An entry is added (`Core::setattr`) and removed (`Batch::commit` of a
//!   record that puts or deletes the inode, and `Core::write_touches`) only
//!   with the inode's stripe held; every record written is one read under
//!   that stripe through `Store::inode`, so it already carries the pending
//!   times, and the entry is dropped when it lands. An entry is therefore
//!   always newer than the record, and never outlives the inode.
//! - What a `kill -9` loses: the touches of the last write interval
//!   (`TOUCH_WRITE_PERIOD_MS`), never a publication, a name or bytes. A
//!   lost touch makes an entry look older to eviction than it was.
//! - Scans of the inode column family (eviction's candidate scan, fsck) do
//!   not see pending touches; eviction writes them before it scans, and
//!   re-reads each candidate under its stripe before it evicts it.
//!
//! Lock: each shard's mutex is a leaf (lock order level 4 in
//! `fs/mod.rs`), held for one map operation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::store::ids::Ino;
use crate::store::meta::Inode;

/// How often pending touches are written in the background.
pub const TOUCH_WRITE_PERIOD_MS: u64 = 1000;
/// Most pending touches; past it a touch is written at once (the map is a
/// bound on memory, not on correctness).
pub const TOUCHES_MAX: usize = 1 << 20;

const SHARDS: usize = 64;

/// The times a touch set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Times {
    mtime_ns: u64,
    atime_ns: Option<u64>,
    ctime_ns: u64,
    mtime_set: bool,
}

pub struct Touches {
    shards: Vec<Mutex<HashMap<Ino, Times>>>,
    /// Entries in all shards, so the common case (none) costs one load.
    len: AtomicUsize,
}

impl Default for Touches {
    fn default() -> Self {
        Touches {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            len: AtomicUsize::new(0),
        }
    }
}

impl Touches {
    fn shard(&self, ino: Ino) -> std::sync::MutexGuard<'_, HashMap<Ino, Times>> {
        self.shards[(ino.0 as usize) % SHARDS]
            .lock()
            .expect("touch shard poisoned (a panic aborts the daemon)")
    }

    /// Remembers the times of `inode` (its stripe held). False if the map is
    /// full: the caller writes the record itself.
    pub fn remember(&self, inode: &Inode) -> bool {
        let times = Times {
            mtime_ns: inode.mtime_ns,
            atime_ns: inode.atime_ns,
            ctime_ns: inode.ctime_ns,
            mtime_set: inode.mtime_set,
        };
        let mut shard = self.shard(inode.ino);
        if !shard.contains_key(&inode.ino) {
            if self.len.load(Ordering::Relaxed) >= TOUCHES_MAX {
                return false;
            }
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        shard.insert(inode.ino, times);
        true
    }

    /// Gives a record read from the database the times pending for it.
    pub fn apply(&self, inode: &mut Inode) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(t) = self.shard(inode.ino).get(&inode.ino) {
            inode.mtime_ns = t.mtime_ns;
            inode.atime_ns = t.atime_ns;
            inode.ctime_ns = t.ctime_ns;
            inode.mtime_set = t.mtime_set;
        }
    }

    /// The record of `ino` was written or deleted (its stripe held).
    pub fn landed(&self, ino: Ino) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        if self.shard(ino).remove(&ino).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The inodes with pending touches now.
    pub fn pending(&self) -> Vec<Ino> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let mut all = Vec::new();
        for s in &self.shards {
            all.extend(s.lock().expect("touch shard poisoned").keys().copied());
        }
        all
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classes::Class;
    use crate::store::ids::BlobId;
    use crate::store::meta::{Content, Kind};

    fn touched(ino: u64, mtime_ns: u64) -> Inode {
        Inode {
            ino: Ino(ino),
            kind: Kind::File,
            class: Class::Result,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size: 1,
            mtime_ns,
            atime_ns: None,
            mtime_set: true,
            ctime_ns: mtime_ns,
            parent: Ino(1),
            name: b"r".to_vec(),
            links: Vec::new(),
            content: Content::Blob(BlobId::of(b"x")),
        }
    }

    #[test]
    fn a_full_map_refuses_new_inodes_but_keeps_taking_touches_of_its_own() {
        let t = Touches::default();
        for ino in 0..TOUCHES_MAX as u64 {
            assert!(t.remember(&touched(ino + 100, 1)));
        }
        assert_eq!(t.len(), TOUCHES_MAX);
        // Full: a new inode's touch is the caller's to write at once.
        assert!(!t.remember(&touched(7, 2)));
        let mut record = touched(7, 0);
        t.apply(&mut record);
        assert_eq!(record.mtime_ns, 0, "a refused touch is not applied");
        // An inode already pending still takes its newer times.
        assert!(t.remember(&touched(100, 3)));
        let mut record = touched(100, 0);
        t.apply(&mut record);
        assert_eq!(record.mtime_ns, 3);
        assert_eq!(t.len(), TOUCHES_MAX);
        // A landed record frees its place.
        t.landed(Ino(100));
        assert_eq!(t.len(), TOUCHES_MAX - 1);
        assert!(t.remember(&touched(7, 4)));
        assert_eq!(t.pending().len(), TOUCHES_MAX);
    }
}
