//! Identities: inode numbers and blob ids, each its own type.

use std::fmt;

use crate::decode::{exact, Decoded};

/// An inode number. `Ino::ROOT` is the mount root; numbers below
/// `Ino::FIRST_DYNAMIC` are reserved for the daemon's virtual files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(pub u64);

impl Ino {
    pub const ROOT: Ino = Ino(1);
    /// The read-only statistics directory `.casfs` and its files.
    pub const STATS_DIR: Ino = Ino(2);
    pub const STATS_TEXT: Ino = Ino(3);
    pub const STATS_JSON: Ino = Ino(4);
    pub const STATS_METRICS: Ino = Ino(5);
    /// Reading it waits until this mount's uploads reached the shared tier.
    pub const STATS_SYNC: Ino = Ino(6);
    /// First number handed out to real files and directories.
    pub const FIRST_DYNAMIC: Ino = Ino(16);
    /// Set in the numbers of the virtual `.casfs/sync-<MARK>` files (a
    /// `casfs sync` in progress: MARK is the clock tick it waits for,
    /// below 2^63 until the year 2262). Never allocated to a real inode.
    const SYNC_MARK_BIT: u64 = 1 << 63;
    /// Set in the numbers of host-local tree files (`fs/local.rs`), handed
    /// out per mount; never in a RocksDB inode (those count up from 16).
    pub const LOCAL_BIT: u64 = 1 << 62;
    /// With `LOCAL_BIT`: a tree file shown in a listing before any lookup
    /// (readdir's numbers are informational); never handed to the kernel
    /// as an inode.
    pub const LOCAL_UNSEEN_BIT: u64 = 1 << 61;

    pub fn is_virtual(self) -> bool {
        (self.0 >= Ino::STATS_DIR.0 && self.0 < Ino::FIRST_DYNAMIC.0) || self.sync_mark().is_some()
    }

    /// A host-local tree file (`fs/local.rs`).
    pub fn is_local(self) -> bool {
        self.0 & (Ino::SYNC_MARK_BIT | Ino::LOCAL_BIT) == Ino::LOCAL_BIT
    }

    /// The virtual file that reports on the sync waiting for `mark`.
    pub fn of_sync_mark(mark: u64) -> Option<Ino> {
        (mark & Ino::SYNC_MARK_BIT == 0).then_some(Ino(mark | Ino::SYNC_MARK_BIT))
    }

    /// The mark a `.casfs/sync-<MARK>` file reports on.
    pub fn sync_mark(self) -> Option<u64> {
        (self.0 & Ino::SYNC_MARK_BIT != 0).then_some(self.0 & !Ino::SYNC_MARK_BIT)
    }

    pub fn key(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// The inode number a key (or value) of exactly 8 bytes holds.
    pub fn from_key(key: &[u8]) -> Decoded<Ino> {
        Ok(Ino(u64::from_be_bytes(exact(key, "an inode number")?)))
    }
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hands out inode numbers from a persisted lease, so allocating one never
/// writes to the store except once per `meta::INO_LEASE` numbers.
///
/// Invariant: every number handed out is below the persisted lease, and the
/// lease is raised (written) before a number above the old one is used; so
/// after a restart, which starts at the lease, no number is reused.
pub struct InoAllocator {
    /// (next number, lease): guarded together; held only to bump them.
    state: std::sync::Mutex<(u64, u64)>,
}

impl InoAllocator {
    pub fn start(persisted_lease: u64) -> InoAllocator {
        let start = persisted_lease.max(Ino::FIRST_DYNAMIC.0);
        InoAllocator {
            state: std::sync::Mutex::new((start, persisted_lease)),
        }
    }

    /// The next number; `persist` writes a new lease when one is needed.
    pub fn next<E>(&self, persist: impl FnOnce(u64) -> Result<(), E>) -> Result<Ino, E> {
        let mut s = self.state.lock().unwrap();
        if s.0 >= s.1 {
            let lease = s.0 + crate::store::meta::INO_LEASE;
            persist(lease)?;
            s.1 = lease;
        }
        let ino = Ino(s.0);
        s.0 += 1;
        Ok(ino)
    }
}

/// A blob's name: the BLAKE3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    pub fn of(bytes: &[u8]) -> BlobId {
        BlobId(*blake3::hash(bytes).as_bytes())
    }

    pub fn from_hex(s: &str) -> Option<BlobId> {
        if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(BlobId(out))
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &self.hex()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_prints_as_64_hex_digits() {
        let id = BlobId::of(b"hello");
        assert_eq!(id.hex().len(), 64);
        assert_eq!(format!("{id}"), id.hex());
    }
}
