//! Real-mount tests of a damaged store: a metadata database with a
//! truncated `CURRENT`, a garbled `MANIFEST` or a truncated table file is
//! refused by `casfs mount` with the command that repairs it, reported by
//! `casfs fsck` with a plan (exit 1, nothing changed), and brought back by
//! `casfs fsck --repair` to a store that mounts, gives ccache hits for what
//! survived and correct objects for everything, and keeps every blob file.
//! And orphan blob files (linked, then the daemon died before it committed)
//! are removed by the sweep after the next mount, while publications of the
//! same bytes racing the sweep keep theirs.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

fn fsck(store: &Path, repair: bool) -> (i32, String) {
    let mut args = vec!["fsck".as_ref(), "--store".as_ref(), store.as_os_str()];
    if repair {
        args.push("--repair".as_ref());
    }
    let out = casfs(&args);
    (out.status.code().unwrap_or(-1), output_text(&out))
}

/// The database's files and their bytes, but RocksDB's own info log (which
/// a failed open may write to).
fn meta_files(store: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(store.join("meta"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(n, _)| !n.starts_with("LOG"))
        .map(|(n, p)| (n, fs::read(p).unwrap()))
        .collect()
}

fn table_files(store: &Path) -> BTreeMap<String, u64> {
    fs::read_dir(store.join("meta"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sst"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

/// Names of the files below `dir/blobs/*/`.
fn blob_names(dir: &Path) -> BTreeSet<String> {
    let Ok(shards) = fs::read_dir(dir.join("blobs")) else {
        return BTreeSet::new();
    };
    shards
        .flat_map(|s| fs::read_dir(s.unwrap().path()).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every blob file is still in the store, or kept beside the saved metadata.
fn assert_blobs_kept(store: &Path, before: &BTreeSet<String>) {
    let mut now = blob_names(store);
    for e in fs::read_dir(store).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("meta.damaged-") {
            now.extend(blob_names(&e.path()));
        }
    }
    let lost: Vec<&String> = before.difference(&now).collect();
    assert!(lost.is_empty(), "blob files lost by the repair: {lost:?}");
}

/// A store with the ccache results of `rounds` builds (one variant each,
/// a clean unmount and a check after each), the jobs of each round, and
/// gcc's objects.
struct Built {
    td: TestDir,
    store: PathBuf,
    mp: PathBuf,
    rounds: Vec<Vec<Job>>,
    reference: PathBuf,
    /// The table files after each round.
    tables: Vec<BTreeMap<String, u64>>,
}

fn build(tag: &str, rounds: usize) -> Built {
    let td = TestDir::new(tag);
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let reference = td.dir("gcc");
    let mut all_rounds = Vec::new();
    let mut tables = Vec::new();
    for round in 0..rounds {
        let jobs = jobs(&[round as u32 + 1]);
        gcc_reference(&jobs, &reference);
        let mut m = Mount::start(&store, &mp, &[]);
        let cc = Ccache::new(&mp.join("cc"), &td.root);
        assert_all_compiled(
            &compile_all(Some(&cc), &jobs, &td.dir(&format!("cold{round}")), 2),
            "cold build",
        );
        m.unmount();
        // A check that may write opens the database as a mount does, which
        // turns its log into table files: each round's records are then in
        // tables of their own.
        let (rc, text) = fsck(&store, true);
        assert_eq!(rc, 0, "the store before the damage is clean:\n{text}");
        tables.push(table_files(&store));
        all_rounds.push(jobs);
    }
    Built {
        td,
        store,
        mp,
        rounds: all_rounds,
        reference,
        tables,
    }
}

/// The checks every kind of damage shares: the mount is refused naming the
/// repair command; fsck reports the damage with a plan, exits 1 and changes
/// nothing; `--repair` exits 1 saying what it did; fsck is clean after it;
/// every blob file is kept. Returns the report of the repair.
fn refused_reported_and_repaired(
    b: &Built,
    damage: &str,
    blobs_before: &BTreeSet<String>,
) -> String {
    let store = &b.store;
    let log = expect_mount_refused(store, &b.mp, &[], damage);
    let command = format!("casfs fsck --store {} --repair", store.display());
    assert!(
        log.contains(&command),
        "the mount's error must name `{command}` ({damage}):\n{log}"
    );
    assert!(
        log.contains("damaged") && !log.contains("panicked"),
        "the mount's error must say the metadata is damaged, not panic ({damage}):\n{log}"
    );
    reported_and_repaired(b, damage, blobs_before)
}

/// The fsck half of `refused_reported_and_repaired`.
fn reported_and_repaired(b: &Built, damage: &str, blobs_before: &BTreeSet<String>) -> String {
    let store = &b.store;
    let before = meta_files(store);
    let (rc, text) = fsck(store, false);
    assert_eq!(
        rc, 1,
        "fsck of a damaged database exits 1 ({damage}):\n{text}"
    );
    assert!(
        text.contains("problem: metadata database:") && text.contains("plan:"),
        "fsck must say what is damaged and the plan ({damage}):\n{text}"
    );
    assert!(
        text.contains("RocksDB's repair") && text.contains("loses"),
        "the plan must say what each step loses ({damage}):\n{text}"
    );
    assert!(
        !text.contains("panicked"),
        "fsck panicked ({damage}):\n{text}"
    );
    assert_eq!(
        meta_files(store),
        before,
        "fsck without --repair changed the database ({damage})"
    );

    let (rc, repaired) = fsck(store, true);
    assert_eq!(
        rc, 1,
        "fsck --repair reports what it repaired ({damage}):\n{repaired}"
    );
    assert!(
        repaired.contains("repaired:") && repaired.contains("mounts again"),
        "fsck --repair must say what it did ({damage}):\n{repaired}"
    );
    let (rc, text) = fsck(store, false);
    assert_eq!(
        rc, 0,
        "after --repair the store is clean ({damage}):\n{text}"
    );
    assert_blobs_kept(store, blobs_before);
    repaired
}

/// Builds `jobs` through ccache on the mounted store, checks every object
/// against gcc's, and returns ccache's (hits, misses).
fn rebuild(b: &Built, cc: &Ccache, jobs: &[Job], tag: &str) -> (u64, u64) {
    cc.zero_stats();
    let out = b.td.dir(tag);
    assert_all_compiled(&compile_all(Some(cc), jobs, &out, 2), tag);
    assert_objects_identical(jobs, &out, &b.reference, tag);
    let stats = cc.print_stats();
    (stats.hits(), stats.misses())
}

/// Mounts the repaired store again and builds `round` once: the mount, its
/// ccache and that build's (hits, misses).
fn remount_and_rebuild(b: &Built, round: usize, tag: &str) -> (Mount, Ccache, (u64, u64)) {
    let m = Mount::start(&b.store, &b.mp, &[]);
    let cc = Ccache::new(&b.mp.join("cc"), &b.td.root);
    let counts = rebuild(b, &cc, &b.rounds[round], tag);
    (m, cc, counts)
}

#[test]
fn truncated_current_is_repaired_by_pointing_it_at_the_newest_manifest_and_loses_nothing() {
    let b = build("dmg-current", 1);
    let blobs = blob_names(&b.store);
    let current = b.store.join("meta/CURRENT");
    let text = fs::read(&current).unwrap();
    fs::write(&current, &text[..9]).unwrap(); // "MANIFEST-", no newline

    let repaired = refused_reported_and_repaired(&b, "truncated CURRENT", &blobs);
    assert!(
        repaired.contains("pointed CURRENT at MANIFEST-") && repaired.contains("no record is lost"),
        "a truncated CURRENT is mended by pointing it at the manifest:\n{repaired}"
    );
    let (mut m, _cc, (hits, misses)) = remount_and_rebuild(&b, 0, "warm");
    assert_eq!(
        (hits, misses),
        (b.rounds[0].len() as u64, 0),
        "every entry survives a truncated CURRENT"
    );
    assert_eq!(
        blob_names(&b.store),
        blobs,
        "every blob file stays in place"
    );
    m.unmount();
}

#[test]
fn garbled_manifest_is_repaired_by_rocksdb_repair_from_the_table_files() {
    let b = build("dmg-manifest", 1);
    let blobs = blob_names(&b.store);
    let manifest = fs::read_dir(b.store.join("meta"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("MANIFEST-")
        })
        .expect("a manifest");
    let mut bytes = fs::read(&manifest).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len / 4..] {
        *b ^= 0x5a;
    }
    fs::write(&manifest, &bytes).unwrap();

    let repaired = refused_reported_and_repaired(&b, "garbled MANIFEST", &blobs);
    assert!(
        repaired.contains("rebuilt the database with RocksDB's repair"),
        "a garbled manifest is rebuilt from the table files:\n{repaired}"
    );
    let (mut m, _cc, (hits, misses)) = remount_and_rebuild(&b, 0, "warm");
    assert_eq!(
        (hits, misses),
        (b.rounds[0].len() as u64, 0),
        "the table files hold every record (a clean unmount flushed them): all hits"
    );
    m.unmount();
}

#[test]
fn truncated_table_file_loses_only_its_records_and_the_cache_refills_them() {
    // Two rounds, two sets of table files: the newest one cut in half
    // holds records of the second round only.
    let b = build("dmg-sst", 2);
    let blobs = blob_names(&b.store);
    let (victim, size) = b.tables[1]
        .iter()
        .filter(|(name, _)| !b.tables[0].contains_key(*name))
        .max_by_key(|(_, size)| **size)
        .map(|(n, s)| (n.clone(), *s))
        .expect("the second round wrote table files");
    let path = b.store.join("meta").join(&victim);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..(size / 2) as usize]).unwrap();

    let repaired = refused_reported_and_repaired(&b, "truncated .sst", &blobs);
    assert!(
        repaired.contains("rebuilt the database with RocksDB's repair")
            && repaired.contains(&victim)
            && repaired.contains("lost:"),
        "the repair names the table file it could not read and what is lost:\n{repaired}"
    );
    let (mut m, cc, (hits, misses)) = remount_and_rebuild(&b, 0, "warm1");
    assert_eq!(
        (hits, misses),
        (b.rounds[0].len() as u64, 0),
        "the first round's records are in the older table files: all hits"
    );
    // The second round's: hits for what survived, misses (recompiled, and
    // correct) for what was in the truncated file.
    let (hits, misses) = rebuild(&b, &cc, &b.rounds[1], "warm2");
    assert_eq!(hits + misses, b.rounds[1].len() as u64);
    // What was recompiled is a hit now.
    let (hits, _) = rebuild(&b, &cc, &b.rounds[1], "warm2-again");
    assert_eq!(hits, b.rounds[1].len() as u64, "the cache re-filled");
    m.unmount();
    let (rc, text) = fsck(&b.store, false);
    assert_eq!(rc, 0, "the re-filled store is clean:\n{text}");
}

#[test]
fn table_block_failing_its_checksum_is_found_by_the_check_and_repaired() {
    // The database opens (a block is read only when asked for); fsck reads
    // every block, finds it, and repairs the database as for a truncated one.
    let b = build("dmg-block", 1);
    let blobs = blob_names(&b.store);
    let (victim, _) = b.tables[0]
        .iter()
        .max_by_key(|(_, size)| **size)
        .map(|(n, s)| (n.clone(), *s))
        .unwrap();
    let path = b.store.join("meta").join(&victim);
    let mut bytes = fs::read(&path).unwrap();
    assert!(bytes.len() > 2000, "{victim}: {} bytes", bytes.len());
    for b in &mut bytes[100..600] {
        *b ^= 0x55;
    }
    fs::write(&path, &bytes).unwrap();

    let repaired = reported_and_repaired(&b, "a block of a .sst", &blobs);
    assert!(
        repaired.contains("checksum") && repaired.contains(&victim),
        "the report names the table file and what RocksDB found:\n{repaired}"
    );
    let (mut m, _cc, (hits, misses)) = remount_and_rebuild(&b, 0, "warm");
    assert_eq!(hits + misses, b.rounds[0].len() as u64);
    m.unmount();
}

/// A blob file no record names, as a crash between link and commit
/// leaves it: `blobs/xx/<blake3 hex>`, read-only.
fn plant_orphan(store: &Path, bytes: &[u8]) -> PathBuf {
    let hex = blake3_hex(bytes);
    let path = store.join("blobs").join(&hex[..2]).join(&hex);
    fs::write(&path, bytes).unwrap();
    let mut perm = fs::metadata(&path).unwrap().permissions();
    perm.set_readonly(true);
    fs::set_permissions(&path, perm).unwrap();
    path
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

#[test]
fn orphan_blob_files_are_swept_after_mount_and_racing_publications_keep_their_bytes() {
    let td = TestDir::new("orphans");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    {
        let mut m = Mount::start(&store, &mp, &[]);
        fs::create_dir_all(mp.join("r")).unwrap();
        publish(
            &mp.join("r"),
            "k.tmp",
            "kept000000000000000000000000R",
            b"a result",
        );
        m.unmount();
    }
    // Many orphans, so the sweep takes a while; the first RACERS of them are
    // published again (the same bytes) while it runs.
    const ORPHANS: usize = 3000;
    const RACERS: usize = 300;
    let contents: Vec<Vec<u8>> = (0..ORPHANS)
        .map(|i| format!("orphan {i} {}", "x".repeat(i % 97)).into_bytes())
        .collect();
    let planted: Vec<PathBuf> = contents.iter().map(|c| plant_orphan(&store, c)).collect();
    let (rc, text) = fsck(&store, false);
    assert_eq!(rc, 0, "orphans are leftovers, not problems:\n{text}");
    assert!(
        text.contains(&format!(
            "{ORPHANS} crash leftovers will be cleaned at the next mount"
        )),
        "{text}"
    );
    // Their ctime must be before the daemon takes the store's lock.
    thread::sleep(Duration::from_millis(100));

    let mut m = Mount::start(&store, &mp, &[]);
    let dir = mp.join("race");
    fs::create_dir_all(&dir).unwrap();
    thread::scope(|s| {
        for t in 0..3 {
            let (dir, contents) = (&dir, &contents);
            s.spawn(move || {
                for i in (t..RACERS).step_by(3) {
                    publish(
                        dir,
                        &format!("t{t}.tmp"),
                        &format!("{i:028}R"),
                        &contents[i],
                    );
                }
            });
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.counter("orphan_sweeps") < 1 {
        assert!(
            Instant::now() < deadline,
            "the orphan sweep did not finish within 60 s:\n{}",
            m.stats_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let removed = m.counter("orphan_blobs_removed") as usize;
    assert!(
        (ORPHANS - RACERS..=ORPHANS).contains(&removed),
        "removed {removed} of {ORPHANS} orphans ({RACERS} were published again meanwhile)"
    );
    for (i, p) in planted.iter().enumerate().skip(RACERS) {
        assert!(!p.exists(), "orphan {i} ({p:?}) survived the sweep");
    }
    for (i, c) in contents.iter().enumerate().take(RACERS) {
        assert_eq!(
            &fs::read(dir.join(format!("{i:028}R"))).unwrap(),
            c,
            "a publication racing the sweep reads its bytes"
        );
    }
    m.unmount();

    // After a remount (every blob verified again at its first open) and a
    // check, nothing is missing and nothing is left over.
    let (rc, text) = fsck(&store, false);
    assert_eq!(rc, 0, "{text}");
    assert!(
        text.contains("is clean") && !text.contains("leftover"),
        "no orphan is left, no published blob is missing:\n{text}"
    );
    let mut m = Mount::start(&store, &mp, &[]);
    for (i, c) in contents.iter().enumerate().take(RACERS) {
        assert_eq!(&fs::read(dir.join(format!("{i:028}R"))).unwrap(), c);
    }
    assert_eq!(
        fs::read(mp.join("r/kept000000000000000000000000R")).unwrap(),
        b"a result"
    );
    assert_eq!(m.counter("corrupt_blobs"), 0);
    m.unmount();
}

#[test]
fn an_fsck_report_piped_into_head_ends_quietly() {
    let td = TestDir::new("fsck-head");
    let store = td.store();
    let out = casfs(&[
        "bench-populate".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--entries".as_ref(),
        "1500".as_ref(),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    // Many problems: far more than a pipe holds (64 KiB) once `head` is gone.
    for f in blob_names(&store).iter().take(1000) {
        fs::remove_file(store.join("blobs").join(&f[..2]).join(f)).unwrap();
    }
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} fsck --store '{}' | head -1; echo \"status=${{PIPESTATUS[0]}}\"",
            CASFS_BIN,
            store.display()
        ))
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(
        text.contains("status=141"),
        "casfs fsck must end by SIGPIPE when its reader goes: {text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}
