//! casfs: a content-addressed FUSE filesystem serving a compiler-cache
//! directory (`CCACHE_DIR`) to many concurrent compilers on many hosts.
//!
//! Layers, each in its own folder, each knowing only the ones below it:
//! - `daemon/`: the mount command: mountpoint checks, signals, background
//!   threads (eviction, scrub, the orphan sweep after mount).
//! - `fuse/`: the only place that knows fuser; translates kernel requests
//!   into calls on `fs::Core` and maps errors to errno (via `error`).
//! - `fs/`: the filesystem core (namespace, publication, handles, kernel
//!   references, `.casfs/` files, maintenance, the seam to the shared tier).
//!   Its module doc holds the lock order.
//! - `store/`: what is on disk: the RocksDB schema and batches, blob files,
//!   the clock, identities, fsck, and the repair of a damaged metadata
//!   database (`store::dbrepair`).
//! - `shared/`: the shared tier (engine trait, shared directory, Redis) and
//!   the upload queue.
//! - `classes`, `integrity`, `stats`, `error`, `size`: path classes, cache
//!   entries' own checksums, counters, the error type, sizes as ccache
//!   writes them.
//! - `decode`: what every decoder of bytes from disk or the network shares
//!   (they are total: an error, never a panic or a made-up zero), and the
//!   seeded test that feeds all of them damaged bytes.

pub mod classes;
pub mod daemon;
pub mod decode;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod integrity;
pub mod shared;
pub mod size;
pub mod stats;
pub mod store;
