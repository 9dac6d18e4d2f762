//! The core's locks: striped inode locks, striped blob locks, and sharded
//! leaf tables. See the lock order in `fs/mod.rs`.
//!
//! - `InodeLocks`: `INODE_STRIPES` reader-writer locks; inode `i` is guarded
//!   by stripe `i % INODE_STRIPES`. A directory's stripe guards its entries;
//!   a file's stripe guards its record. Writers of a set of inodes take
//!   their stripes in ascending stripe order, once each (`lock`), so two
//!   operations can never wait on each other in a cycle. Operations on
//!   unrelated names share a stripe only by collision (1 in `INODE_STRIPES`).
//! - `BlobLocks`: the same for blob ids (the reference set of a blob, its
//!   record and its file's presence), taken after the inode stripes.
//! - `Sharded<T>`: tables (handles, inode use) split in `SHARDS` mutexes,
//!   held only for a map operation: never across I/O or another lock.
//!
//! Every wait for an inode or blob stripe is timed into `Stats::lock_wait`,
//! so contention on a many-core host shows in `.casfs/metrics`.
//!
//! Invariant: a thread takes a lock only at a level above every level it
//! holds, and never waits on a condition while it holds a stripe
//! (`Level`, `hold`, `assert_no_stripe_held`). Each thread counts what it
//! holds per level in a thread-local; every taking of a stripe or a leaf
//! lock asserts the order with a plain `assert!` (one thread-local read),
//! so the release build the tests run checks it too.
//! # Why `lock().unwrap()` is correct here and everywhere in casfs
//!
//! Locks are taken with `.lock().unwrap()` (and `read`, `write`, `wait`
//! likewise) on purpose. The daemon is built with `panic = "abort"`
//! (`[profile.release]` in Cargo.toml): a panic ends the whole process
//! before any other thread runs again, so no thread ever finds a lock
//! poisoned, and `unwrap` on a lock cannot fail in the daemon. What a panic
//! leaves is what `kill -9` leaves, which crash-safety promise 7 covers.
//! Where unwinding does happen (the library's own tests, which Cargo builds
//! with unwinding), a poisoned lock means a test has already failed, and
//! `unwrap` makes every thread that touches the lock fail loudly too.
//!
//! So there is no lock helper: one would be `lock().unwrap()` spelled
//! differently, and the other choice, taking the guard back from a
//! poisoned lock (`PoisonError::into_inner`), would carry on with whatever
//! half-made change the panicking thread left: the half-alive daemon the
//! abort exists to prevent. (Two locks do take the guard back: the Redis
//! connection pool and the in-memory test engine, whose state is valid
//! whatever a panic interrupted.)

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use crate::stats::Histogram;
use crate::store::ids::{BlobId, Ino};

/// Stripes of the inode locks.
pub const INODE_STRIPES: usize = 1024;
/// Stripes of the blob locks.
pub const BLOB_STRIPES: usize = 256;
/// Shards of each leaf table.
pub const SHARDS: usize = 16;

/// The levels of the lock order in `fs/mod.rs`, lowest taken first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// 1: the directory-rename mutex.
    DirRename = 1,
    /// 2: inode stripes (shared or exclusive).
    Inode = 2,
    /// 3: blob stripes.
    Blob = 3,
    /// 4: leaf locks (sharded tables, the usage shards), one at a time.
    Leaf = 4,
}

const LEVELS: usize = 5;

thread_local! {
    /// How many holds of each level this thread has (index = level).
    static HELD: Cell<[u16; LEVELS]> = const { Cell::new([0; LEVELS]) };
}

/// One hold of a level by this thread; released on drop, in any order.
pub struct LevelHold {
    level: Level,
}

/// Records that this thread takes a lock of `level`, asserting the order:
/// nothing of this level or above may be held already. (Inode stripes are
/// taken in one `lock` call, which counts as one hold.)
pub fn hold(level: Level) -> LevelHold {
    HELD.with(|h| {
        let mut held = h.get();
        let above = &held[level as usize..];
        assert!(
            above.iter().all(|&n| n == 0),
            "lock order: taking {level:?} while holding {held:?} (counts by level 1..4)"
        );
        held[level as usize] += 1;
        h.set(held);
    });
    LevelHold { level }
}

impl Drop for LevelHold {
    fn drop(&mut self) {
        HELD.with(|h| {
            let mut held = h.get();
            held[self.level as usize] -= 1;
            h.set(held);
        });
    }
}

/// Asserts that this thread holds no directory-rename, inode or blob lock:
/// called before every wait on a condition (a seal ending), whose length
/// no one bounds.
pub fn assert_no_stripe_held(what: &str) {
    HELD.with(|h| {
        let held = h.get();
        assert!(
            held[..Level::Leaf as usize].iter().all(|&n| n == 0),
            "lock order: {what} waits while holding {held:?} (counts by level 1..4)"
        );
    });
}

/// A guard that also counts as a hold of its level (`hold`). The hold is
/// declared after the guard, so it is released after the lock.
pub struct Held<G> {
    _guard: G,
    _level: LevelHold,
}

impl<G> Held<G> {
    /// Takes `level` (asserting the order), then the lock `take` returns.
    pub fn take(level: Level, take: impl FnOnce() -> G) -> Held<G> {
        let _level = hold(level);
        Held {
            _guard: take(),
            _level,
        }
    }
}

pub struct InodeLocks {
    stripes: Vec<RwLock<()>>,
}

/// Exclusive hold on the stripes of a set of inodes, released on drop.
pub struct InodeGuard<'a> {
    _held: Vec<RwLockWriteGuard<'a, ()>>,
    _level: LevelHold,
}

fn stripe_of(ino: Ino) -> usize {
    (ino.0 % INODE_STRIPES as u64) as usize
}

/// Takes a lock, timing the wait when it is contended.
fn timed<G>(wait: &Histogram, try_take: impl Fn() -> Option<G>, take: impl Fn() -> G) -> G {
    if let Some(g) = try_take() {
        return g;
    }
    let t0 = Instant::now();
    let g = take();
    wait.observe(t0.elapsed());
    g
}

impl InodeLocks {
    pub fn new() -> InodeLocks {
        InodeLocks {
            stripes: (0..INODE_STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    /// Exclusive hold on every inode in `inos` (in any order, repeats fine).
    pub fn lock(&self, inos: &[Ino], wait: &Histogram) -> InodeGuard<'_> {
        let _level = hold(Level::Inode);
        let mut idx: Vec<usize> = inos.iter().map(|i| stripe_of(*i)).collect();
        idx.sort_unstable();
        idx.dedup();
        let held = idx
            .into_iter()
            .map(|i| {
                let s = &self.stripes[i];
                timed(wait, || s.try_write().ok(), || s.write().unwrap())
            })
            .collect();
        InodeGuard {
            _held: held,
            _level,
        }
    }

    /// Shared hold on one inode: lookups of names in a directory take it so
    /// that no unbind of the same directory runs between reading a name and
    /// counting the kernel's reference to it.
    pub fn read(&self, ino: Ino, wait: &Histogram) -> Held<RwLockReadGuard<'_, ()>> {
        let s = &self.stripes[stripe_of(ino)];
        Held::take(Level::Inode, || {
            timed(wait, || s.try_read().ok(), || s.read().unwrap())
        })
    }
}

pub struct BlobLocks {
    stripes: Vec<Mutex<()>>,
}

/// Hold on the stripes of a set of blobs, released on drop.
pub struct BlobGuard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
    ids: Vec<BlobId>,
    _level: LevelHold,
}

impl BlobGuard<'_> {
    /// True if `id`'s stripe is held (for assertions).
    pub fn covers(&self, id: &BlobId) -> bool {
        self.ids.contains(id)
    }
}

impl BlobLocks {
    pub fn new() -> BlobLocks {
        BlobLocks {
            stripes: (0..BLOB_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    pub fn lock(&self, ids: &[BlobId], wait: &Histogram) -> BlobGuard<'_> {
        let _level = hold(Level::Blob);
        let mut idx: Vec<usize> = ids
            .iter()
            .map(|id| id.0[0] as usize % BLOB_STRIPES)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let held = idx
            .into_iter()
            .map(|i| {
                let s = &self.stripes[i];
                timed(wait, || s.try_lock().ok(), || s.lock().unwrap())
            })
            .collect();
        BlobGuard {
            _held: held,
            ids: ids.to_vec(),
            _level,
        }
    }
}

/// A map split into `SHARDS` independently locked parts (a leaf lock).
pub struct Sharded<K, V> {
    shards: Vec<Mutex<HashMap<K, V>>>,
}

pub trait ShardKey {
    fn shard(&self) -> usize;
}

impl ShardKey for Ino {
    fn shard(&self) -> usize {
        (self.0 % SHARDS as u64) as usize
    }
}

impl ShardKey for u64 {
    fn shard(&self) -> usize {
        (*self % SHARDS as u64) as usize
    }
}

impl ShardKey for BlobId {
    fn shard(&self) -> usize {
        self.0[0] as usize % SHARDS
    }
}

impl<K: ShardKey + Hash + Eq, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: ShardKey + Hash + Eq, V> Sharded<K, V> {
    pub fn new() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Runs `f` on the shard holding `key` (held only for `f`).
    pub fn with<R>(&self, key: &K, f: impl FnOnce(&mut HashMap<K, V>) -> R) -> R {
        let _level = hold(Level::Leaf);
        f(&mut self.shards[key.shard()].lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_taken_upwards_and_released_in_any_order() {
        let wait = Histogram::default();
        let inodes = InodeLocks::new();
        let blobs = BlobLocks::new();
        let table: Sharded<u64, ()> = Sharded::new();
        let i = inodes.lock(&[Ino(7)], &wait);
        let b = blobs.lock(&[BlobId([1; 32])], &wait);
        table.with(&1, |m| m.insert(1, ()));
        drop(i); // before the blob stripe: holds are counted, not stacked
        drop(b);
        let _again = inodes.lock(&[Ino(7)], &wait);
    }

    #[test]
    #[should_panic(expected = "lock order")]
    fn an_inode_stripe_under_a_blob_stripe_is_refused() {
        let wait = Histogram::default();
        let (blobs, inodes) = (BlobLocks::new(), InodeLocks::new());
        let _b = blobs.lock(&[BlobId([1; 32])], &wait);
        let _i = inodes.lock(&[Ino(7)], &wait);
    }

    #[test]
    #[should_panic(expected = "lock order")]
    fn a_leaf_lock_under_another_is_refused() {
        let table: Sharded<u64, ()> = Sharded::new();
        table.with(&1, |_| table.with(&2, |_| ()));
    }

    #[test]
    #[should_panic(expected = "waits while holding")]
    fn a_seal_wait_under_a_stripe_is_refused() {
        let wait = Histogram::default();
        let inodes = InodeLocks::new();
        let _i = inodes.lock(&[Ino(7)], &wait);
        assert_no_stripe_held("a test wait");
    }
}
