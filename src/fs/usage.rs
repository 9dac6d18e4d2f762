//! What the kernel and open handles hold of each inode, in memory only.
//!
//! Per inode: the kernel's lookup count (references it may still use by
//! number), open handles, handles open for writing, whether a publication
//! is preparing its staged bytes (`sealing`), whether it was created
//! under a create-only name and waits to be bound at close, and whether it
//! was written since its mtime was last stamped or set (`written`).
//!
//! Invariants:
//! - An inode whose use is non-zero is never deleted (`Core::maybe_forget`).
//! - While `sealing` is set, no new writer is admitted: the staged file a
//!   publication hashes is the file it publishes. Writers and sealers wait
//!   on the shard's condition variable, with no other lock held.
//! - Entries whose use is all zero are removed, so the table's size is
//!   bounded by what the kernel and open handles hold.
//! - No count goes below zero: every forget, close and end of a writer
//!   undoes one remember, open or writer counted before. Asserted (also in
//!   release builds), not clamped, so a miscount shows where it happens
//!   instead of letting an inode in use be deleted later.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::fs::locks::{assert_no_stripe_held, hold, Level, LevelHold, ShardKey, SHARDS};
use crate::store::ids::Ino;

#[derive(Default, Clone, Copy, Debug)]
struct Use {
    lookups: u64,
    handles: u32,
    writers: u32,
    sealing: bool,
    awaiting_bind: bool,
    /// Written through a handle since the mtime was last stamped (at a
    /// FLUSH) or set by a client: the next FLUSH stamps the clock's now.
    /// Only meaningful while handles are open, so not part of `idle`.
    written: bool,
}

impl Use {
    fn idle(&self) -> bool {
        self.lookups == 0
            && self.handles == 0
            && self.writers == 0
            && !self.sealing
            && !self.awaiting_bind
    }
}

pub struct Usage {
    shards: Vec<(Mutex<HashMap<Ino, Use>>, Condvar)>,
}

impl Usage {
    pub fn new() -> Usage {
        Usage {
            shards: (0..SHARDS)
                .map(|_| (Mutex::new(HashMap::new()), Condvar::new()))
                .collect(),
        }
    }

    /// The shard of `ino`: a leaf lock (its hold is released after the
    /// guard, as the caller's bindings drop in reverse order).
    fn shard(&self, ino: Ino) -> (LevelHold, MutexGuard<'_, HashMap<Ino, Use>>, &Condvar) {
        let (m, c) = &self.shards[ino.shard()];
        let leaf = hold(Level::Leaf);
        (leaf, m.lock().unwrap(), c)
    }

    /// Waits for a seal of `ino` to end (no stripe may be held: no one
    /// bounds how long a seal takes).
    fn wait_unsealed<'a>(
        ino: Ino,
        mut map: MutexGuard<'a, HashMap<Ino, Use>>,
        cond: &Condvar,
    ) -> MutexGuard<'a, HashMap<Ino, Use>> {
        while map.get(&ino).is_some_and(|u| u.sealing) {
            assert_no_stripe_held("a wait for a seal to end");
            map = cond.wait(map).unwrap();
        }
        map
    }

    fn update<R>(&self, ino: Ino, f: impl FnOnce(&mut Use) -> R) -> R {
        let (_leaf, mut map, _) = self.shard(ino);
        let u = map.entry(ino).or_default();
        let r = f(u);
        if u.idle() {
            map.remove(&ino);
        }
        r
    }

    /// The kernel learned `ino` (a lookup, create, mkdir... reply).
    pub fn remember(&self, ino: Ino) {
        if !ino.is_virtual() {
            self.update(ino, |u| u.lookups += 1);
        }
    }

    /// The kernel forgot `n` references; true if it holds none now.
    /// Virtual inodes are not counted (see `remember`).
    pub fn forget(&self, ino: Ino, n: u64) -> bool {
        if ino.is_virtual() {
            return false;
        }
        self.update(ino, |u| {
            u.lookups = u.lookups.checked_sub(n).unwrap_or_else(|| {
                panic!(
                    "kernel forgot {n} references to ino={ino} but holds {} (lookup count invariant)",
                    u.lookups
                )
            });
            u.lookups == 0
        })
    }

    /// True while the kernel or a handle holds `ino`.
    pub fn in_use(&self, ino: Ino) -> bool {
        let (_leaf, map, _) = self.shard(ino);
        map.get(&ino)
            .is_some_and(|u| u.lookups > 0 || u.handles > 0)
    }

    pub fn has_handles(&self, ino: Ino) -> bool {
        let (_leaf, map, _) = self.shard(ino);
        map.get(&ino).is_some_and(|u| u.handles > 0)
    }

    pub fn handles(&self, ino: Ino) -> u64 {
        let (_leaf, map, _) = self.shard(ino);
        map.get(&ino).map_or(0, |u| u.handles as u64)
    }

    pub fn writers(&self, ino: Ino) -> u32 {
        let (_leaf, map, _) = self.shard(ino);
        map.get(&ino).map_or(0, |u| u.writers)
    }

    /// A handle opens. A writer waits while a publication seals the file.
    pub fn open(&self, ino: Ino, writer: bool) {
        let (_leaf, mut map, cond) = self.shard(ino);
        if writer {
            map = Self::wait_unsealed(ino, map, cond);
        }
        let u = map.entry(ino).or_default();
        u.handles += 1;
        if writer {
            u.writers += 1;
        }
    }

    /// A handle closes (`writer`: it still counted as a writer).
    pub fn close(&self, ino: Ino, writer: bool) {
        self.update(ino, |u| {
            u.handles = u
                .handles
                .checked_sub(1)
                .expect("a handle closes that was opened (handle count invariant)");
            if writer {
                u.writers = u
                    .writers
                    .checked_sub(1)
                    .expect("a writer closes that was counted (writer count invariant)");
            }
        });
    }

    /// A handle stops counting as a writer (its bytes are being published).
    pub fn writer_done(&self, ino: Ino) {
        self.update(ino, |u| {
            u.writers = u
                .writers
                .checked_sub(1)
                .expect("a writer is done that was counted (writer count invariant)")
        });
    }

    /// A handle whose bytes were published writes again (`restage`); waits
    /// while a publication seals the file.
    pub fn writer_again(&self, ino: Ino) {
        let (_leaf, mut map, cond) = self.shard(ino);
        map = Self::wait_unsealed(ino, map, cond);
        map.entry(ino).or_default().writers += 1;
    }

    /// Starts sealing `ino`'s staged bytes for publication: waits for another
    /// seal of it to end, then refuses (false) if a writer holds it.
    pub fn begin_seal(&self, ino: Ino) -> bool {
        let (_leaf, mut map, cond) = self.shard(ino);
        map = Self::wait_unsealed(ino, map, cond);
        let u = map.entry(ino).or_default();
        if u.writers > 0 {
            if u.idle() {
                map.remove(&ino);
            }
            return false;
        }
        u.sealing = true;
        true
    }

    pub fn end_seal(&self, ino: Ino) {
        let (_leaf, mut map, cond) = self.shard(ino);
        if let Some(u) = map.get_mut(&ino) {
            u.sealing = false;
            if u.idle() {
                map.remove(&ino);
            }
        }
        cond.notify_all();
    }

    /// A handle wrote (or preallocated, or punched a hole in) `ino`.
    pub fn mark_written(&self, ino: Ino) {
        self.update(ino, |u| u.written = true);
    }

    /// True if `ino` was written since its mtime was last stamped or set;
    /// clears the mark (the caller stamps or sets the mtime).
    pub fn take_written(&self, ino: Ino) -> bool {
        self.update(ino, |u| std::mem::take(&mut u.written))
    }

    /// True if `ino` was written since its mtime was last stamped or set.
    pub fn written(&self, ino: Ino) -> bool {
        let (_leaf, map, _) = self.shard(ino);
        map.get(&ino).is_some_and(|u| u.written)
    }

    pub fn set_awaiting_bind(&self, ino: Ino, on: bool) {
        self.update(ino, |u| u.awaiting_bind = on);
    }

    pub fn awaiting_bind(&self, ino: Ino) -> bool {
        let (_leaf, map, _) = self.shard(ino);
        map.get(&ino).is_some_and(|u| u.awaiting_bind)
    }
}
