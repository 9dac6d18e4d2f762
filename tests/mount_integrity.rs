//! Real-mount tests of blob integrity after a blob was verified once: a
//! blob file changed under the store (a byte flipped by a stray tool) is
//! never served again, whether the kernel reads it through the daemon or
//! directly (FUSE passthrough), a writer never copies it into a new
//! version, and a new publication of the same bytes
//! never binds a name to the damaged file: it heals it.
//!
//! The scrub is off (`--scrub-interval-ms 0`) so that only the open and
//! publication paths can find the damage.

mod common;

use common::*;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A result name (ccache ≤ 4.12 layout) and a generic (mutable) name.
const RESULT: &str = "c8aiq5frsd7ctaaepqbvl8shkb4kcjcR";
const OTHER_RESULT: &str = "d8aiq5frsd7ctaaepqbvl8shkb4kcjcR";
const GENERIC: &str = "notes.txt";
const OTHER_GENERIC: &str = "notes-copy.txt";
const BYTES_LEN: usize = 200_000;

fn blob_path(store: &Path, bytes: &[u8]) -> PathBuf {
    let hex = blake3::hash(bytes).to_hex().to_string();
    store.join("blobs").join(&hex[..2]).join(&hex)
}

/// Flips one byte of the blob file of `bytes` in place, as a stray tool
/// would (`dd conv=notrunc`), and makes it durable.
fn flip_blob_byte(store: &Path, bytes: &[u8], at: usize) {
    let path = blob_path(store, bytes);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open blob file {path:?} to damage it: {e}"));
    f.write_all_at(&[bytes[at] ^ 0x55], at as u64)
        .unwrap_or_else(|e| panic!("flip a byte of {path:?}: {e}"));
    f.sync_all().unwrap();
}

/// Drops the kernel's clean page cache (`echo 1 > /proc/sys/vm/drop_caches`),
/// so no read is answered from pages cached before the damage. Pages only
/// (not 3, which also drops dentries and inodes): the kernel keeps its inodes,
/// and the daemon what it keeps per inode (registered backing files).
fn drop_page_cache() {
    fs::write("/proc/sys/vm/drop_caches", "1")
        .unwrap_or_else(|e| panic!("echo 1 > /proc/sys/vm/drop_caches (needs root): {e}"));
}

fn read_all(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = fs::File::open(p)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// Reads `name` and fails unless it returns exactly `expected`.
fn assert_reads(mp: &Path, name: &str, expected: &[u8], what: &str) {
    match read_all(&mp.join(name)) {
        Ok(v) if v == expected => {}
        Ok(v) => panic!(
            "{what}: {name} read {} bytes that are not its content ({} bytes differ)",
            v.len(),
            v.iter().zip(expected).filter(|(a, b)| a != b).count()
                + v.len().abs_diff(expected.len())
        ),
        Err(e) => panic!("{what}: reading {name} failed: {e}"),
    }
}

fn passthrough_note(m: &Mount) -> &'static str {
    if m.log().contains("FUSE passthrough for result reads: on") {
        "passthrough on"
    } else {
        "passthrough off"
    }
}

#[test]
fn flipped_blob_after_verified_read_is_not_served() {
    let td = TestDir::new("flip-verified");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&store, &mp, &["--scrub-interval-ms", "0"]);
    let result = pattern(1, BYTES_LEN);
    let generic = pattern(2, BYTES_LEN);
    publish(&mp, "r.tmp", RESULT, &result);
    publish(&mp, "g.tmp", GENERIC, &generic);
    assert_reads(&mp, RESULT, &result, "first read of the result");
    assert_reads(&mp, GENERIC, &generic, "first read of the generic file");
    assert!(
        m.counter("blobs_verified") >= 2,
        "the first reads must have verified both blobs: {}",
        m.stats_text()
    );
    assert_eq!(m.counter("corrupt_blobs"), 0);

    flip_blob_byte(&store, &result, BYTES_LEN / 2);
    flip_blob_byte(&store, &generic, 17);
    drop_page_cache();

    for (name, bytes) in [(RESULT, &result), (GENERIC, &generic)] {
        match read_all(&mp.join(name)) {
            Ok(v) => panic!(
                "{name}: a blob file damaged after its verified read was served ({} bytes, {}; {})",
                v.len(),
                if v == *bytes {
                    "the original bytes, from a cache the test failed to drop"
                } else {
                    "with the flipped byte"
                },
                passthrough_note(&m)
            ),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOENT)),
                "{name}: reading a damaged blob must fail with EIO (or miss), got {e}"
            ),
        }
    }
    assert!(
        m.counter("corrupt_blobs") >= 2,
        "corrupt_blobs must count both damaged blobs: {}",
        m.stats_text()
    );
    // Quarantined and unbound: later opens miss (the cache refills them).
    for name in [RESULT, GENERIC] {
        let e = errno_of(read_all(&mp.join(name)), name);
        assert!(
            e == libc::ENOENT || e == libc::EIO,
            "{name}: after the damage was found, a read must miss or fail, got {}",
            errno_name(e)
        );
    }
    // Published again, the correct bytes read back.
    publish(&mp, "r.tmp", RESULT, &result);
    assert_reads(&mp, RESULT, &result, "the result published again");
}

#[test]
fn publication_onto_damaged_blob_file_reads_back_its_own_bytes() {
    let td = TestDir::new("flip-dedup");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&store, &mp, &["--scrub-interval-ms", "0"]);
    let result = pattern(3, BYTES_LEN);
    let generic = pattern(4, BYTES_LEN);
    publish(&mp, "r.tmp", RESULT, &result);
    publish(&mp, "g.tmp", GENERIC, &generic);
    // Verified (and, with passthrough, a backing file registered for the
    // result's inode, kept for its next open).
    assert_reads(&mp, RESULT, &result, "first read of the result");
    assert_reads(&mp, GENERIC, &generic, "first read of the generic file");

    flip_blob_byte(&store, &result, 5);
    flip_blob_byte(&store, &generic, BYTES_LEN - 1);

    // The same correct bytes under new names: they dedup onto the damaged
    // files, which must be checked and replaced, not bound as they are.
    publish(&mp, "r2.tmp", OTHER_RESULT, &result);
    publish(&mp, "g2.tmp", OTHER_GENERIC, &generic);
    assert_reads(
        &mp,
        OTHER_RESULT,
        &result,
        "new result name on a damaged blob",
    );
    assert_reads(
        &mp,
        OTHER_GENERIC,
        &generic,
        "new generic name on a damaged blob",
    );
    assert_eq!(
        m.counter("corrupt_blobs"),
        2,
        "both damaged blob files must be found and counted: {}",
        m.stats_text()
    );
    // The blob files hold the correct bytes again, and the old names (whose
    // inodes the kernel still knows) read them: the result's backing file
    // registered on the damaged file must not serve it.
    assert_eq!(fs::read(blob_path(&store, &result)).unwrap(), result);
    assert_eq!(fs::read(blob_path(&store, &generic)).unwrap(), generic);
    assert_reads(
        &mp,
        RESULT,
        &result,
        &format!(
            "first result name after its blob file was healed ({})",
            passthrough_note(&m)
        ),
    );
    assert_reads(
        &mp,
        GENERIC,
        &generic,
        "first generic name after its blob file was healed",
    );
    let quarantined = store
        .join("quarantine")
        .join(blake3::hash(&result).to_hex().to_string());
    let kept = fs::read(&quarantined)
        .unwrap_or_else(|e| panic!("the damaged file must be kept at {quarantined:?}: {e}"));
    assert_ne!(kept, result, "the quarantined copy is the damaged one");
}

#[test]
fn reopen_while_a_descriptor_holds_a_replaced_blob_file_never_reads_the_old_file() {
    let td = TestDir::new("flip-held");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&store, &mp, &["--scrub-interval-ms", "0"]);
    let result = pattern(5, BYTES_LEN);
    publish(&mp, "r.tmp", RESULT, &result);
    // Held open across the damage and the replacement (with passthrough,
    // the kernel keeps this descriptor's backing file attached to the inode).
    let held = fs::File::open(mp.join(RESULT)).unwrap();
    let mut first = vec![0u8; 16];
    held.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, result[..16]);

    flip_blob_byte(&store, &result, 9);
    publish(&mp, "r2.tmp", OTHER_RESULT, &result);
    assert_eq!(m.counter("corrupt_blobs"), 1, "{}", m.stats_text());
    assert_reads(&mp, OTHER_RESULT, &result, "new name on a healed blob");

    // A new open of the held inode: its correct bytes, or EIO while the
    // descriptor on the old file is open; never the old file's bytes.
    match read_all(&mp.join(RESULT)) {
        Ok(v) => assert!(
            v == result,
            "a new open read the replaced (damaged) file ({})",
            passthrough_note(&m)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "a new open while an old descriptor holds the replaced file: {e}"
        ),
    }
    drop(held);
    assert_reads(
        &mp,
        RESULT,
        &result,
        "the result once the old descriptor is closed",
    );
}

/// What a name damaged under the store reads after a writer touched it:
/// it must miss or fail, never return bytes.
fn assert_gone_or_failing(mp: &Path, name: &str, what: &str) {
    match read_all(&mp.join(name)) {
        Ok(v) => panic!("{what}: {name} still reads {} bytes", v.len()),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOENT)),
            "{what}: reading {name} must fail with EIO (or miss), got {e}"
        ),
    }
}

#[test]
fn a_writer_never_copies_a_damaged_blob_into_its_new_version() {
    let td = TestDir::new("flip-copyup");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    // No sampled verification at open and no scrub: only the copy made for
    // a writer can notice the damage.
    let m = Mount::start(
        &store,
        &mp,
        &["--scrub-interval-ms", "0", "--verify-percent", "0"],
    );
    let generic = pattern(3, BYTES_LEN);
    let other = pattern(4, BYTES_LEN);
    publish(&mp, "g.tmp", GENERIC, &generic);
    publish(&mp, "o.tmp", OTHER_GENERIC, &other);
    flip_blob_byte(&store, &generic, BYTES_LEN - 3);
    flip_blob_byte(&store, &other, 3);
    drop_page_cache();

    // A write in place copies the rest from the published (damaged) bytes.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mp.join(GENERIC))
        .unwrap();
    let e = f
        .write_all_at(b"X", 0)
        .expect_err("a write that copies a damaged blob must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(f);
    assert_gone_or_failing(&mp, GENERIC, "after a write in place");
    let mut damaged = generic.clone();
    damaged[BYTES_LEN - 3] ^= 0x55;
    damaged[0] = b'X';
    assert!(
        !blob_path(&store, &damaged).exists(),
        "a blob of the damaged bytes was stored"
    );

    // A truncate by path keeps a prefix of them.
    let e = fs::OpenOptions::new()
        .write(true)
        .open(mp.join(OTHER_GENERIC))
        .and_then(|f| f.set_len(BYTES_LEN as u64 / 2))
        .expect_err("a truncate that keeps damaged bytes must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_gone_or_failing(&mp, OTHER_GENERIC, "after a truncate");
    assert_eq!(
        m.counter("corrupt_blobs"),
        2,
        "both damaged blobs must be found and counted: {}",
        m.stats_text()
    );
}
