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

pub struct InodeLocks {
    stripes: Vec<RwLock<()>>,
}

/// Exclusive hold on the stripes of a set of inodes, released on drop.
pub struct InodeGuard<'a> {
    _held: Vec<RwLockWriteGuard<'a, ()>>,
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
        InodeGuard { _held: held }
    }

    /// Shared hold on one inode: lookups of names in a directory take it so
    /// that no unbind of the same directory runs between reading a name and
    /// counting the kernel's reference to it.
    pub fn read(&self, ino: Ino, wait: &Histogram) -> RwLockReadGuard<'_, ()> {
        let s = &self.stripes[stripe_of(ino)];
        timed(wait, || s.try_read().ok(), || s.read().unwrap())
    }
}

pub struct BlobLocks {
    stripes: Vec<Mutex<()>>,
}

/// Hold on the stripes of a set of blobs, released on drop.
pub struct BlobGuard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
    ids: Vec<BlobId>,
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

impl<K: ShardKey + Hash + Eq, V> Sharded<K, V> {
    pub fn new() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Runs `f` on the shard holding `key` (held only for `f`).
    pub fn with<R>(&self, key: &K, f: impl FnOnce(&mut HashMap<K, V>) -> R) -> R {
        f(&mut self.shards[key.shard()].lock().unwrap())
    }
}
