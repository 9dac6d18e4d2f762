//! Real-mount tests of running casfs on a build farm: read-only mounts
//! serve hits and refuse every change, `--max-size` keeps the store under
//! its budget while builds run and evicts no further than its low-water
//! mark under a stream of publications, `casfs fsck` finds and repairs injected
//! damage, and a loop of `kill -9` at random moments during parallel ccache
//! builds always leaves a store that fsck calls clean and that gives
//! gcc-identical objects. `CASFS_KILL_LOOPS=N` runs the loop longer (CI: 4).

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

fn fsck(store: &Path, repair: bool) -> (i32, String) {
    let mut args = vec!["fsck".as_ref(), "--store".as_ref(), store.as_os_str()];
    if repair {
        args.push("--repair".as_ref());
    }
    let out = casfs(&args);
    (out.status.code().unwrap_or(-1), output_text(&out))
}

#[test]
fn read_only_mount_serves_hits_and_refuses_every_change() {
    let td = TestDir::new("ro");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let all = jobs(&[1]);
    let reference = td.dir("gcc");
    gcc_reference(&all, &reference);
    {
        let m = Mount::start(&store, &mp, &[]);
        let cc = Ccache::new(&mp.join("cc"), &td.root);
        assert_all_compiled(
            &compile_all(Some(&cc), &all, &td.dir("cold"), 2),
            "cold build",
        );
        publish(&mp, "x.tmp", "0000000000000000000000000000aR", b"entry");
        drop(m);
    }
    let _m = Mount::start(&store, &mp, &["-o", "ro"]);
    assert_eq!(
        fs::read(mp.join("0000000000000000000000000000aR")).unwrap(),
        b"entry"
    );
    for (what, r) in [
        ("create", fs::write(mp.join("new"), b"x").map(|_| ())),
        ("mkdir", fs::create_dir(mp.join("d"))),
        (
            "unlink",
            fs::remove_file(mp.join("0000000000000000000000000000aR")),
        ),
        (
            "rename",
            fs::rename(mp.join("0000000000000000000000000000aR"), mp.join("y")),
        ),
        (
            "truncate",
            fs::OpenOptions::new()
                .write(true)
                .open(mp.join("0000000000000000000000000000aR"))
                .map(|_| ()),
        ),
    ] {
        assert_eq!(
            errno_of(r, what),
            libc::EROFS,
            "{what} on a read-only mount"
        );
    }
    // ccache in its own read-only mode consumes the cache: all hits.
    let cc = Ccache::new(&mp.join("cc"), &td.root);
    let out = td.dir("warm");
    let mut results = Vec::new();
    for job in &all {
        let variant = format!("-DCASFS_VARIANT={}", job.variant);
        let mut c = cc.command();
        c.env("CCACHE_READONLY", "1")
            .arg("gcc")
            .arg("-O2")
            .arg(&variant);
        c.arg("-I")
            .arg(csrc_dir())
            .arg("-c")
            .arg(&job.src)
            .arg("-o")
            .arg(out.join(&job.obj));
        results.push(c.output().unwrap());
    }
    for r in &results {
        assert!(
            r.status.success(),
            "read-only ccache build failed: {}",
            output_text(r)
        );
    }
    assert_objects_identical(&all, &out, &reference, "read-only warm build");
}

#[test]
fn max_size_keeps_the_store_under_budget_while_builds_run() {
    let td = TestDir::new("evict");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let all = jobs(&[1, 2, 3, 4]);
    let reference = td.dir("gcc");
    gcc_reference(&all, &reference);
    let max: u64 = 64 * 1024;
    let m = Mount::start(&store, &mp, &["--max-size", "64Ki"]);
    let cc = Ccache::new(&mp.join("cc"), &td.root);
    let out = td.dir("cold");
    assert_all_compiled(
        &compile_all(Some(&cc), &all, &out, 3),
        "build under a size limit",
    );
    assert_objects_identical(&all, &out, &reference, "build under a size limit");
    // The evictor runs twice a second.
    let mut stored = u64::MAX;
    for _ in 0..50 {
        stored = m.counter("bytes_stored");
        if stored <= max {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        stored <= max,
        "store holds {stored} bytes, over the 64 KiB limit"
    );
    assert!(m.counter("evictions") > 0, "nothing was evicted");
    // ccache's own view and its own cleanup through the mount still work,
    // and a second build (some hits, some misses) is still correct.
    cc.run(&["-s"]);
    cc.run(&["--max-size", "100K"]);
    cc.run(&["-c"]);
    let out2 = td.dir("second");
    assert_all_compiled(&compile_all(Some(&cc), &all, &out2, 3), "second build");
    assert_objects_identical(&all, &out2, &reference, "second build under a size limit");
}

/// ccache's way of filling a cache, as fast as one client can: 80 results
/// of 12.4 KB, each written to a temporary file and renamed onto its name,
/// under `--max-size 400K`. Eviction runs when a publication takes the store
/// over the limit, and stops at its low-water mark (90 %): it used to count
/// evicted names whose inodes the kernel had not forgotten yet as still
/// stored, and kept evicting until 2 entries (6 % of the budget) were left.
#[test]
fn eviction_under_a_stream_of_publications_stops_at_its_low_water_mark() {
    let td = TestDir::new("evict-stream");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    const BUDGET: u64 = 400 * 1024;
    const ENTRY: usize = 12_400;
    const ENTRIES: u64 = 80;
    let name = |i: u64| format!("{i:029}R");
    let mut m = Mount::start(&store, &mp, &["--max-size", "400Ki"]);
    let d = mp.join("a/b");
    fs::create_dir_all(&d).unwrap();
    for i in 0..ENTRIES {
        publish(&d, "t.tmp", &name(i), &pattern(100 + i, ENTRY));
    }
    // The daemon's own listing and counters (the kernel may still show an
    // evicted name until it processes the invalidation).
    let listed: Vec<String> = list_dir(&d);
    let evictions = m.counter("evictions");
    let kept = ENTRIES - evictions;
    let kept_bytes = kept * ENTRY as u64;
    assert!(
        (BUDGET * 80 / 100..=BUDGET * 95 / 100).contains(&kept_bytes),
        "{kept} entries ({kept_bytes} bytes, {} % of the {BUDGET}-byte budget) kept after \
         {evictions} evictions; eviction must stop at its low-water mark (80-95 %).\n{}",
        kept_bytes * 100 / BUDGET,
        m.log()
    );
    // Least recently used first: what is kept is the newest, intact.
    let newest: Vec<String> = (ENTRIES - kept..ENTRIES).map(name).collect();
    assert_eq!(listed, newest, "the newest {kept} entries are kept");
    for i in ENTRIES - kept..ENTRIES {
        assert_eq!(fs::read(d.join(name(i))).unwrap(), pattern(100 + i, ENTRY));
    }
    // Once the kernel has let go of the evicted files (a remount), the
    // store holds exactly what is kept.
    m.unmount();
    let mut m = Mount::start(&store, &mp, &["--max-size", "400Ki"]);
    assert_eq!(
        (m.counter("blobs"), m.counter("bytes_stored")),
        (kept, kept_bytes),
        "the store after a remount"
    );
    m.unmount();
}

#[test]
fn fsck_finds_and_repairs_flipped_byte_missing_blob_and_dangling_entry() {
    let td = TestDir::new("fsck");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    {
        let m = Mount::start(&store, &mp, &[]);
        let d = mp.join("a/b");
        fs::create_dir_all(&d).unwrap();
        for i in 0..6u64 {
            publish(&d, "t.tmp", &format!("{i:029}R"), &pattern(i, 3000));
        }
        fs::write(mp.join("a/stats"), b"local counters").unwrap();
        drop(m);
    }
    let (rc, text) = fsck(&store, false);
    assert_eq!(
        rc, 0,
        "a store fresh from a clean unmount must be clean:\n{text}"
    );

    let mut blob_files: Vec<_> = fs::read_dir(store.join("blobs"))
        .unwrap()
        .flat_map(|s| fs::read_dir(s.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    blob_files.sort();
    assert!(blob_files.len() >= 6);
    // A flipped byte.
    let mut bytes = fs::read(&blob_files[0]).unwrap();
    bytes[100] ^= 0xff;
    let _ = Command::new("chmod")
        .arg("u+w")
        .arg(&blob_files[0])
        .status();
    fs::write(&blob_files[0], &bytes).unwrap();
    // A deleted blob.
    fs::remove_file(&blob_files[1]).unwrap();
    // A dangling entry: a name whose record points at a blob that is gone
    // (`blob_files[1]`). Host-local files (`a/stats`) have no record: they
    // live in the store's host-local tree, which fsck leaves alone.

    let (rc, text) = fsck(&store, false);
    assert_eq!(rc, 1, "fsck must report the damage:\n{text}");
    assert!(
        text.contains("corrupt"),
        "flipped byte not reported:\n{text}"
    );
    assert!(
        text.contains("missing"),
        "deleted blob not reported:\n{text}"
    );
    assert!(
        text.contains("dangling") || text.contains("missing"),
        "dangling entry not reported:\n{text}"
    );
    let (rc, text) = fsck(&store, true);
    assert_eq!(rc, 1, "--repair reports what it repaired:\n{text}");
    let (rc, text) = fsck(&store, false);
    assert_eq!(rc, 0, "after --repair the store must be clean:\n{text}");

    // The repaired store mounts; the damaged names are gone, the rest intact.
    let _m = Mount::start(&store, &mp, &[]);
    let left: Vec<String> = list_dir(&mp.join("a/b"));
    assert_eq!(
        left.len(),
        4,
        "two damaged entries dropped, four kept: {left:?}"
    );
    for name in &left {
        let i: u64 = name.trim_end_matches('R').parse().unwrap();
        assert_eq!(
            fs::read(mp.join("a/b").join(name)).unwrap(),
            pattern(i, 3000)
        );
    }
    assert_eq!(
        fs::read(mp.join("a/stats")).unwrap(),
        b"local counters",
        "host-local files are not touched by fsck"
    );
}

#[test]
fn kill9_loop_during_parallel_builds_leaves_clean_store_and_correct_objects() {
    let loops: usize = std::env::var("CASFS_KILL_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let td = TestDir::new("killloop");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let all = jobs(&[1, 2, 3]);
    let reference = td.dir("gcc");
    gcc_reference(&all, &reference);
    let mut seed = std::process::id() as u64 ^ 0x5eed;
    for round in 0..loops {
        let mut m = Mount::start(&store, &mp, &[]);
        let cc = Ccache::new(&mp.join("cc"), &td.root);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay_ms = 50 + (seed >> 33) % 1500;
        let out = td.dir(&format!("crash{round}"));
        thread::scope(|s| {
            let build = s.spawn(|| compile_all(Some(&cc), &all, &out, 4));
            thread::sleep(Duration::from_millis(delay_ms));
            m.kill9();
            let _ = build.join();
        });
        eprintln!("round {round}: killed after {delay_ms} ms");
        let out_unmount = casfs(&["unmount".as_ref(), mp.as_os_str()]);
        if is_mounted(&mp) {
            panic!(
                "round {round}: dead mount not cleared: {}",
                output_text(&out_unmount)
            );
        }
        drop(m);
        let (rc, text) = fsck(&store, false);
        assert_eq!(
            rc, 0,
            "round {round}: fsck after kill -9 at {delay_ms} ms:\n{text}"
        );
        let m = Mount::start(&store, &mp, &[]);
        let warm = td.dir(&format!("warm{round}"));
        assert_all_compiled(
            &compile_all(Some(&cc), &all, &warm, 2),
            "build after remount",
        );
        assert_objects_identical(
            &all,
            &warm,
            &reference,
            &format!("round {round}: build after kill -9 and remount"),
        );
        drop(m);
    }
}

#[test]
fn online_scrub_finds_a_corrupt_blob_without_any_read() {
    let td = TestDir::new("scrub");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    {
        let m = Mount::start(&store, &mp, &[]);
        publish(
            &mp,
            "t.tmp",
            "00000000000000000000000000000R",
            &pattern(9, 5000),
        );
        drop(m);
    }
    let blob = fs::read_dir(store.join("blobs"))
        .unwrap()
        .flat_map(|s| fs::read_dir(s.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .next()
        .expect("one blob");
    let _ = Command::new("chmod").arg("u+w").arg(&blob).status();
    let mut bytes = fs::read(&blob).unwrap();
    bytes[7] ^= 1;
    fs::write(&blob, &bytes).unwrap();
    let m = Mount::start(
        &store,
        &mp,
        &["--scrub-interval-ms", "20", "--verify-percent", "0"],
    );
    for _ in 0..100 {
        if m.counter("corrupt_blobs") > 0 {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        m.counter("corrupt_blobs"),
        1,
        "the scrub did not find the corrupt blob"
    );
    assert!(m.counter("blobs_scrubbed") >= 1);
    assert_eq!(
        errno_of(
            fs::read(mp.join("00000000000000000000000000000R")),
            "read scrubbed name"
        ),
        libc::ENOENT
    );
}
