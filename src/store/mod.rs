//! What casfs keeps on disk: the metadata database (`meta`: one RocksDB
//! column family per kind of record, every multi-key change in one batch),
//! blob files named by their BLAKE3 hash (`blobs`), the hybrid logical clock
//! (`clock`), identity types (`ids`), free space and the reserve kept on the
//! store's filesystem (`space`), touches not yet written (`touches`), the
//! offline checker (`fsck`) and the repair of a damaged metadata database
//! (`dbrepair`).

pub mod blobs;
pub mod clock;
pub mod dbrepair;
pub mod fsck;
pub mod ids;
pub mod meta;
pub mod space;
pub mod touches;
