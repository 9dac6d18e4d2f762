//! Whether a result's stored bytes pass their own format's integrity check.
//!
//! Create-only means the first *valid* content wins (DESIGN promise 3): a
//! result that fails its own checksum may be replaced by a newcomer that
//! passes it. This module knows ccache's entry formats (from ccache's
//! sources, `CacheEntry.cpp` and its predecessors); every integer is
//! big-endian:
//!
//! - ≥ 4.7 (format version 1): `cc ac 01 <type> <compression> <level>
//!   <self_contained> <creation_time:8> <len:1><version> <len:1><namespace>
//!   <entry_size:8>`, the payload as stored (zstd or not), then an epilogue
//!   of 16 bytes: XXH3-128 (high 64 bits, low 64 bits) of every byte before
//!   it. Always checkable.
//! - 4.5–4.6 (format version 0): the same header without `self_contained`;
//!   the checksum covers the *uncompressed* entry and is written through the
//!   compressor, so only an uncompressed entry can be checked here.
//! - 4.0–4.4: `cCrS` (result) or `cCmF` (manifest), version, compression,
//!   level, `content_size:8`, payload, then XXH3-64 of the uncompressed
//!   entry, also through the compressor: checkable when uncompressed.
//!
//! Anything else (2.x/3.x files, raw object files, zstd-compressed entries
//! of ≤ 4.6, unknown future versions, bytes that are no ccache entry at
//! all) cannot be judged, and counts as valid: only a definite checksum
//! failure makes a result replaceable.
//!
//! Invariant: the verdict is a pure function of the bytes, so a verdict on a
//! blob (immutable under its id) stays true for as long as the blob exists.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::Xxh3;

/// What the format's own check says about some stored bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A recognised format whose checksum matches.
    Valid,
    /// A recognised format whose checksum does not match, or that is too
    /// short to hold its own header and checksum.
    Corrupt,
    /// Not a format we can check: treated as valid.
    Unknown,
}

const MAGIC_V4_5: [u8; 2] = [0xcc, 0xac];
const MAGIC_V4_0_RESULT: &[u8; 4] = b"cCrS";
const MAGIC_V4_0_MANIFEST: &[u8; 4] = b"cCmF";
/// Compression type "none" in every 4.x header.
const COMPRESSION_NONE: u8 = 0;
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// How a recognised entry is checked: the checksum of `file[..len - tail]`
/// must equal the last `tail` bytes.
enum Check {
    Xxh3_128,
    Xxh3_64,
}

/// Judges a ccache entry stored in `file` (read with `pread`: the file's
/// offset is left alone).
pub fn check_file(file: &File) -> io::Result<Verdict> {
    let len = file.metadata()?.len();
    let mut head = [0u8; 7];
    let head_len = read_full_at(file, &mut head, 0)?;
    let check = match classify(&head[..head_len], len) {
        Ok(check) => check,
        Err(verdict) => return Ok(verdict),
    };
    let tail_len: u64 = match check {
        Check::Xxh3_128 => 16,
        Check::Xxh3_64 => 8,
    };
    let body_len = len - tail_len;
    let mut hasher = Xxh3::new();
    let mut at = 0u64;
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    while at < body_len {
        let want = ((body_len - at) as usize).min(buf.len());
        let n = read_full_at(file, &mut buf[..want], at)?;
        if n < want {
            return Ok(Verdict::Corrupt); // shrank while being read
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    let mut stored = [0u8; 16];
    let tail = &mut stored[..tail_len as usize];
    if read_full_at(file, tail, body_len)? < tail.len() {
        return Ok(Verdict::Corrupt);
    }
    let matches = match check {
        Check::Xxh3_128 => hasher.digest128().to_be_bytes() == stored,
        Check::Xxh3_64 => hasher.digest().to_be_bytes() == stored[..8],
    };
    Ok(verdict_of(matches))
}

/// Judges an entry held in memory (tests and small callers).
pub fn check_bytes(bytes: &[u8]) -> Verdict {
    let check = match classify(&bytes[..bytes.len().min(7)], bytes.len() as u64) {
        Ok(check) => check,
        Err(verdict) => return verdict,
    };
    match check {
        Check::Xxh3_128 => {
            let (body, sum) = bytes.split_at(bytes.len() - 16);
            let digest = xxhash_rust::xxh3::xxh3_128(body).to_be_bytes();
            verdict_of(digest[..] == *sum)
        }
        Check::Xxh3_64 => {
            let (body, sum) = bytes.split_at(bytes.len() - 8);
            let digest = xxhash_rust::xxh3::xxh3_64(body).to_be_bytes();
            verdict_of(digest[..] == *sum)
        }
    }
}

fn verdict_of(matches: bool) -> Verdict {
    if matches {
        Verdict::Valid
    } else {
        Verdict::Corrupt
    }
}

/// From the first bytes and the length: how to check, or the verdict when
/// there is nothing to check.
fn classify(head: &[u8], len: u64) -> Result<Check, Verdict> {
    // magic(2) version type compression level [self_contained(1)]
    // creation_time(8) two length bytes entry_size(8), then the epilogue.
    const V1_MIN_BYTES: u64 = 2 + 4 + 1 + 8 + 2 + 8 + 16;
    const V0_MIN_BYTES: u64 = 2 + 4 + 8 + 2 + 8 + 16;
    // magic(4) version compression level content_size(8), then XXH3-64.
    const V4_0_MIN_BYTES: u64 = 4 + 3 + 8 + 8;
    match head {
        [m0, m1, 1, ..] if [*m0, *m1] == MAGIC_V4_5 => {
            if len < V1_MIN_BYTES {
                return Err(Verdict::Corrupt);
            }
            Ok(Check::Xxh3_128)
        }
        [m0, m1, 0, _type, compression, ..] if [*m0, *m1] == MAGIC_V4_5 => {
            if len < V0_MIN_BYTES {
                return Err(Verdict::Corrupt);
            }
            if *compression != COMPRESSION_NONE {
                return Err(Verdict::Unknown);
            }
            Ok(Check::Xxh3_128)
        }
        [a, b, c, d, _version, compression, ..]
            if [*a, *b, *c, *d] == *MAGIC_V4_0_RESULT
                || [*a, *b, *c, *d] == *MAGIC_V4_0_MANIFEST =>
        {
            if len < V4_0_MIN_BYTES {
                return Err(Verdict::Corrupt);
            }
            if *compression != COMPRESSION_NONE {
                return Err(Verdict::Unknown);
            }
            Ok(Check::Xxh3_64)
        }
        _ => Err(Verdict::Unknown),
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A format-1 entry (ccache ≥ 4.7) around `payload`.
    pub fn entry_v1(entry_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0xcc, 0xac, 1, entry_type, 0, 1, 1];
        v.extend_from_slice(&1_700_000_000u64.to_be_bytes());
        v.push(5);
        v.extend_from_slice(b"4.7.5");
        v.push(0);
        let size = (v.len() + 8 + payload.len() + 16) as u64;
        v.extend_from_slice(&size.to_be_bytes());
        v.extend_from_slice(payload);
        let sum = xxhash_rust::xxh3::xxh3_128(&v).to_be_bytes();
        v.extend_from_slice(&sum);
        v
    }

    #[test]
    fn format_1_entries_are_checked() {
        let good = entry_v1(0, b"object bytes");
        assert_eq!(check_bytes(&good), Verdict::Valid);
        let mut bad = good.clone();
        bad[30] ^= 1;
        assert_eq!(check_bytes(&bad), Verdict::Corrupt);
        assert_eq!(check_bytes(&good[..20]), Verdict::Corrupt);
        let f = tempfile_with(&bad);
        assert_eq!(check_file(&f).unwrap(), Verdict::Corrupt);
        let f = tempfile_with(&good);
        assert_eq!(check_file(&f).unwrap(), Verdict::Valid);
    }

    #[test]
    fn uncheckable_bytes_are_unknown() {
        assert_eq!(check_bytes(b""), Verdict::Unknown);
        assert_eq!(check_bytes(b"\x7fELF object"), Verdict::Unknown);
        // Format 0 with zstd: the checksum is inside the compressed stream.
        let mut v0 = vec![0xcc, 0xac, 0, 0, 1, 1];
        v0.resize(80, 7);
        assert_eq!(check_bytes(&v0), Verdict::Unknown);
        let mut old = b"cCrS\x00\x01\x01".to_vec();
        old.resize(80, 7);
        assert_eq!(check_bytes(&old), Verdict::Unknown);
    }

    #[test]
    fn uncompressed_older_formats_are_checked() {
        let mut v0 = vec![0xcc, 0xac, 0, 0, COMPRESSION_NONE, 0];
        v0.resize(60, 3);
        let sum = xxhash_rust::xxh3::xxh3_128(&v0).to_be_bytes();
        v0.extend_from_slice(&sum);
        assert_eq!(check_bytes(&v0), Verdict::Valid);
        v0[40] ^= 1;
        assert_eq!(check_bytes(&v0), Verdict::Corrupt);
        let mut old = b"cCrS\x00\x00\x00".to_vec();
        old.resize(50, 9);
        let sum = xxhash_rust::xxh3::xxh3_64(&old).to_be_bytes();
        old.extend_from_slice(&sum);
        assert_eq!(check_bytes(&old), Verdict::Valid);
        old[20] ^= 1;
        assert_eq!(check_bytes(&old), Verdict::Corrupt);
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "casfs-integrity-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&path, bytes).unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
