//! Every decoder of bytes from disk or the network, fed every prefix of
//! valid encodings, random mutations of them and random garbage: each must
//! return (a value or an error), never panic; valid encodings must decode
//! to what was encoded, and the strict decoders must accept only what
//! their encoder writes.
//!
//! Seeded: each run takes a fresh seed (or `CASFS_FUZZ_SEED=N`) and a
//! failure names the seed, the decoder and the input, so it replays with
//! `CASFS_FUZZ_SEED=N cargo test --release --lib decode::fuzz`.
//! `CASFS_FUZZ_ROUNDS` sets how many mutated and random inputs each
//! decoder gets (default `ROUNDS_DEFAULT`).
//!
//! Decoders covered (add new ones here):
//! - store: `Ino::from_key`, `Inode::decode`, `PendingUpload::decode`,
//!   `split_upload_key`, `PendingReason::decode`, `split_dentry_key`,
//!   `split_blob_ref_key`, `blob_key_id`, `u64_value`, `lease_value`,
//!   `gauge_value`, the gauges' merge (`merge_gauge`);
//! - shared tier: `Record::decode`, `Record::decode_or_data`, the directory
//!   engine's `parse_list_entry` and `check_marker`, Redis `read_reply`
//!   (under several bounds) and `parse_list_member`, `BlobId::from_hex`;
//! - ccache entries: `integrity::check_bytes`, `integrity::check_file`,
//!   `Class::resolve`, `Class::from_code`;
//! - `/proc/self/mountinfo` paths: `daemon::unescape_mount_path`.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::classes::Class;
use crate::shared::{dir, redis, Record, RecordKind};
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{self, Content, Inode, Kind, PendingReason, PendingUpload};

const ROUNDS_DEFAULT: usize = 3000;
/// Longest random garbage input.
const GARBAGE_BYTES_MAX: usize = 300;
/// Of the mutated inputs, how many `check_file` gets (each is a file).
const FILE_CHECKS_MAX: usize = 300;

/// splitmix64: small, fast, and the same sequence for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        // Half the time a byte that means something to some decoder.
        const INTERESTING: &[u8] =
            b"\x00\x01\x02\x03\x04\x07\xff\xcc\xac\r\n $*:+-/.%0123456789abcdefFcasfs-record";
        if self.next().is_multiple_of(2) {
            INTERESTING[self.below(INTERESTING.len())]
        } else {
            self.next() as u8
        }
    }
}

fn seed() -> u64 {
    match std::env::var("CASFS_FUZZ_SEED") {
        Ok(s) => s.parse().expect("CASFS_FUZZ_SEED is a u64"),
        Err(_) => crate::store::clock::wall_ns() ^ u64::from(std::process::id()).rotate_left(32),
    }
}

fn rounds() -> usize {
    std::env::var("CASFS_FUZZ_ROUNDS")
        .ok()
        .map(|s| s.parse().expect("CASFS_FUZZ_ROUNDS is a number"))
        .unwrap_or(ROUNDS_DEFAULT)
}

/// One to four random edits of `valid`.
fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut v = valid.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.byte();
            }
            2 => v.insert(at, rng.byte()),
            3 if !v.is_empty() => {
                v.remove(rng.below(v.len()));
            }
            4 => v.truncate(at),
            _ => {
                let n = rng.below(16);
                let tail: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                v.splice(at..at, tail);
            }
        }
    }
    v
}

fn garbage(rng: &mut Rng) -> Vec<u8> {
    let n = match rng.below(4) {
        0 => rng.below(9),
        1 => rng.below(49),
        _ => rng.below(GARBAGE_BYTES_MAX + 1),
    };
    (0..n).map(|_| rng.byte()).collect()
}

/// Every input a decoder gets: each valid encoding whole and at every
/// length, then `rounds` mutations of them and `rounds` random inputs.
fn inputs(rng: &mut Rng, valid: &[Vec<u8>], rounds: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for v in valid {
        for n in 0..=v.len() {
            out.push(v[..n].to_vec());
        }
    }
    for _ in 0..rounds {
        match valid {
            [] => out.push(garbage(rng)),
            _ => {
                let pick = rng.below(valid.len());
                out.push(mutate(rng, &valid[pick]));
            }
        }
        out.push(garbage(rng));
    }
    out
}

/// Runs `decode` on every input; a panic fails the test naming the seed,
/// the decoder and the input.
fn check(seed: u64, name: &str, inputs: &[Vec<u8>], decode: impl Fn(&[u8])) {
    for input in inputs {
        if catch_unwind(AssertUnwindSafe(|| decode(input))).is_err() {
            panic!(
                "decoder {name} panicked on {} bytes {:?} (seed {seed}: replay with \
                 CASFS_FUZZ_SEED={seed} cargo test --release --lib decode::fuzz)",
                input.len(),
                input.escape_ascii().to_string()
            );
        }
    }
}

fn inodes() -> Vec<Inode> {
    let file = Inode {
        ino: Ino(42),
        kind: Kind::File,
        class: Class::Result,
        perm: 0o644,
        uid: 1000,
        gid: 1000,
        nlink: 1,
        size: 12345,
        mtime_ns: 1_700_000_000_000_000_001,
        atime_ns: None,
        mtime_set: false,
        ctime_ns: 1_700_000_000_000_000_002,
        parent: Ino(17),
        name: b"c8aiq5frsd7ctaaepqbvl8shkb4kcjcR".to_vec(),
        links: Vec::new(),
        content: Content::Blob(BlobId::of(b"object")),
    };
    vec![
        file.clone(),
        Inode {
            kind: Kind::Dir,
            class: Class::Mutable,
            nlink: 3,
            content: Content::None,
            ..file.clone()
        },
        Inode {
            kind: Kind::Symlink,
            content: Content::Symlink(b"../target".to_vec()),
            ..file.clone()
        },
        Inode {
            kind: Kind::CharDevice,
            class: Class::Local,
            content: Content::Device(0x0801),
            ..file.clone()
        },
        Inode {
            class: Class::CcacheEntry,
            content: Content::Staged,
            atime_ns: Some(7),
            links: vec![(Ino(3), b"other".to_vec()), (Ino(4), b"third".to_vec())],
            ..file
        },
    ]
}

fn upload() -> PendingUpload {
    PendingUpload {
        seq: 1_700_000_000_000_000_123,
        path: b"cc/a/e/c8aiq5frsd7ctaaepqbvl8shkb4kcjcR".to_vec(),
        create_only: true,
        blob: BlobId::of(b"x"),
        size: 99,
        mode: 0o644,
        mtime_ns: 5,
    }
}

/// A ccache ≥ 4.7 entry (format 1) around `payload`, with its checksum.
fn ccache_entry(entry_type: u8, payload: &[u8]) -> Vec<u8> {
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
fn every_decoder_returns_an_error_and_never_panics_on_damaged_bytes() {
    let seed = seed();
    let rounds = rounds();
    let mut rng = Rng(seed);
    eprintln!("decode fuzz: seed {seed}, {rounds} rounds");

    // Inode records: valid ones decode to what was encoded.
    let inodes = inodes();
    for i in &inodes {
        assert_eq!(
            Inode::decode(i.ino, &i.encode()).as_ref(),
            Ok(i),
            "seed {seed}"
        );
    }
    let valid: Vec<Vec<u8>> = inodes.iter().map(Inode::encode).collect();
    check(
        seed,
        "Inode::decode",
        &inputs(&mut rng, &valid, rounds),
        |b| {
            let _ = Inode::decode(Ino(42), b);
        },
    );

    // Fixed-width keys and values.
    let keys = vec![
        Ino(42).key().to_vec(),
        [&Ino(1).key()[..], b"name"].concat(),
        [&BlobId::of(b"x").0[..], &Ino(42).key()[..]].concat(),
        BlobId::of(b"x").0.to_vec(),
        7u64.to_le_bytes().to_vec(),
        (-7i64).to_le_bytes().to_vec(),
        vec![1],
        vec![2],
    ];
    check(
        seed,
        "store key and value decoders",
        &inputs(&mut rng, &keys, rounds),
        |b| {
            let _ = Ino::from_key(b);
            let _ = meta::split_dentry_key(b);
            let _ = meta::split_blob_ref_key(b);
            let _ = meta::blob_key_id(b);
            let _ = meta::split_upload_key(b);
            let _ = meta::u64_value(b);
            let _ = meta::lease_value(b);
            let _ = meta::gauge_value(b);
            let _ = PendingReason::decode(b);
        },
    );
    assert_eq!(Ino::from_key(&Ino(42).key()), Ok(Ino(42)));
    assert!(
        Ino::from_key(&[0; 7]).is_err(),
        "a short inode number is refused"
    );
    assert!(
        meta::u64_value(&[1, 2, 3]).is_err(),
        "a short value is no zero"
    );
    assert!(meta::lease_value(&u64::MAX.to_le_bytes()).is_err());

    // The gauges' merge: any value and operands give a value; one that
    // does not decode makes the gauge damaged (never a zero, never a loss).
    let gauge_inputs = inputs(&mut rng, &keys[4..6], rounds);
    for (i, existing) in gauge_inputs.iter().enumerate() {
        let op = &gauge_inputs[(i * 7919) % gauge_inputs.len()];
        let merged = catch_unwind(|| {
            meta::merge_gauge(
                Some(existing),
                [op.as_slice(), &5i64.to_le_bytes()].into_iter(),
            )
        })
        .unwrap_or_else(|_| panic!("merge_gauge panicked on {existing:?} + {op:?} (seed {seed})"));
        let both_good = meta::gauge_value(existing).is_ok() && meta::gauge_value(op).is_ok();
        assert_eq!(meta::gauge_value(&merged).is_ok(), both_good, "seed {seed}");
        assert!(
            meta::gauge_value(&meta::merge_gauge(Some(&merged), std::iter::empty())).is_ok()
                == both_good,
            "a damaged gauge stays damaged (seed {seed})"
        );
    }

    // Pending uploads: key and value, each damaged while the other is valid.
    let up = upload();
    assert_eq!(
        PendingUpload::decode(&up.key(), &up.encode()),
        Ok(up.clone())
    );
    let values = inputs(&mut rng, &[up.encode()], rounds);
    let keys = inputs(&mut rng, &[up.key()], rounds);
    check(seed, "PendingUpload::decode (value)", &values, |v| {
        if let Ok(u) = PendingUpload::decode(&up.key(), v) {
            assert_eq!(u.encode(), v, "only what encode writes is accepted");
        }
    });
    check(seed, "PendingUpload::decode (key)", &keys, |k| {
        if let Ok(u) = PendingUpload::decode(k, &up.encode()) {
            assert_eq!(u.key(), k);
        }
    });

    // Shared-tier records: only the canonical form decodes.
    let records = [
        Record {
            kind: RecordKind::File {
                blob: BlobId::of(b"x"),
                size: 12,
                mode: 0o644,
            },
            mtime_ns: 1_700_000_000_000_000_001,
        },
        Record {
            kind: RecordKind::Dir,
            mtime_ns: 5,
        },
    ];
    let valid: Vec<Vec<u8>> = records.iter().map(Record::encode).collect();
    check(
        seed,
        "Record::decode",
        &inputs(&mut rng, &valid, rounds),
        |b| {
            if let Ok(r) = Record::decode(b) {
                assert_eq!(r.encode(), b, "a record that decodes re-encodes the same");
            }
            let _ = Record::decode_or_data(b, &"fuzz");
            let _ = BlobId::from_hex(&String::from_utf8_lossy(b));
        },
    );

    // The directory engine's listing names and marker.
    let valid = vec![
        b"f.c8aiq5frsd7ctaaepqbvl8shkb4kcjcR".to_vec(),
        b"d.a%20b%2F".to_vec(),
        b"casfs shared format 1\n".to_vec(),
    ];
    check(
        seed,
        "dir listing and marker",
        &inputs(&mut rng, &valid, rounds),
        |b| {
            let _ = dir::parse_list_entry(b);
            let _ = dir::check_marker(b);
        },
    );

    // RESP replies, under bounds from none to any.
    let valid = vec![
        b"+OK\r\n".to_vec(),
        b"-ERR wrong\r\n".to_vec(),
        b":42\r\n".to_vec(),
        b"$-1\r\n".to_vec(),
        b"$4\r\nab\r\n\r\n".to_vec(),
        b"*2\r\n$1\r\n0\r\n*2\r\n$3\r\nf/a\r\n$3\r\nd/b\r\n".to_vec(),
        b"*-1\r\n".to_vec(),
    ];
    check(
        seed,
        "redis read_reply",
        &inputs(&mut rng, &valid, rounds),
        |b| {
            for bound in [0, 3, 4096, u64::MAX] {
                let _ = redis::read_reply(&mut io::Cursor::new(b), bound);
            }
            let _ = redis::parse_list_member(b);
        },
    );

    // ccache entry headers and checksums, in memory and in files.
    let valid = vec![
        ccache_entry(0, b"object bytes"),
        ccache_entry(1, b"manifest"),
        b"cCrS\x00\x00\x00"
            .iter()
            .chain(&[9u8; 20])
            .copied()
            .collect(),
        vec![0xcc, 0xac, 0, 0, 0, 0],
    ];
    let entries = inputs(&mut rng, &valid, rounds);
    check(
        seed,
        "integrity::check_bytes, Class::resolve",
        &entries,
        |b| {
            let _ = crate::integrity::check_bytes(b);
            for class in [
                Class::Result,
                Class::Mutable,
                Class::Local,
                Class::CcacheEntry,
            ] {
                let _ = class.resolve(b);
            }
            let _ = Class::from_code(b.first().copied().unwrap_or(0));
        },
    );
    let dir = std::env::temp_dir().join(format!("casfs-fuzz-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file_inputs: Vec<Vec<u8>> = entries.iter().take(FILE_CHECKS_MAX).cloned().collect();
    check(seed, "integrity::check_file", &file_inputs, |b| {
        let path = dir.join("entry");
        std::fs::write(&path, b).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let _ = crate::integrity::check_file(&f);
    });
    let _ = std::fs::remove_dir_all(&dir);

    // Mount paths from /proc/self/mountinfo.
    let valid = vec![b"/srv/cc\\040cache".to_vec(), b"/a\\134b\\011".to_vec()];
    check(
        seed,
        "unescape_mount_path",
        &inputs(&mut rng, &valid, rounds),
        |b| {
            let _ = crate::daemon::unescape_mount_path(&String::from_utf8_lossy(b));
        },
    );
    assert_eq!(
        crate::daemon::unescape_mount_path("/srv/cc\\040cache\\777"),
        b"/srv/cc cache\\777"
    );
}
