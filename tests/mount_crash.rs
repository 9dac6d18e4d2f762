//! Real-mount tests of the daemon's life cycle and crash safety: it exits 0
//! and leaves nothing mounted after `umount`, SIGTERM, SIGINT and
//! `casfs unmount`, keeping what was published; after `kill -9` the dead mount
//! is cleared by `casfs unmount`, the store reopens without repair, every
//! publication that was acknowledged (rename returned, ccache exited 0) is
//! still there and intact, nothing half-written is visible, and a ccache build
//! that was killed halfway completes with objects identical to plain gcc's.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

fn mkdir(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir -p {p:?}: {e}"));
}

fn result_name(i: usize) -> String {
    format!("{i:030}R")
}

fn manifest_name(i: usize) -> String {
    format!("{i:030}M")
}

/// After `kill -9`: the dead mount answers ENOTCONN (over the ring, after
/// the kernel's teardown: see below) and `casfs unmount`
/// clears it. (If the daemon mounted with auto-unmount, the kernel has
/// already removed it and there is nothing to clear.)
fn clear_dead_mount(mp: &Path) {
    if !is_mounted(mp) {
        eprintln!("note: {mp:?} was already unmounted when the daemon died (auto-unmount)");
        return;
    }
    // Over FUSE over io_uring the kernel tears the dead daemon's ring down
    // asynchronously (io_uring's exit work): a request caught in between is
    // ended with ECANCELED or ECONNABORTED. Then every one is ENOTCONN.
    let deadline = Instant::now() + Duration::from_secs(EXIT_TIMEOUT_S);
    let e = loop {
        let e = errno_of(fs::metadata(mp.join("x")), "stat on the dead mount");
        if (e == libc::ECANCELED || e == libc::ECONNABORTED) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        break e;
    };
    assert_eq!(e, libc::ENOTCONN, "stat on a dead mount: {}", errno_name(e));
    let out = casfs(&["unmount".as_ref(), mp.as_os_str()]);
    assert!(
        out.status.success(),
        "casfs unmount of a dead mount failed:\n{}",
        output_text(&out)
    );
    assert!(
        !is_mounted(mp),
        "casfs unmount left the dead mount in place"
    );
}

/// The `casfs` binary the tests run (and so the daemon) aborts on a panic
/// (`panic = "abort"` in Cargo.toml): one panicking thread ends the process
/// with SIGABRT, never unwinds into exit code 101 or lives on beside the
/// others. The panic is a real one, with no hook in casfs: printing to a
/// full stderr panics in std (`eprintln!`), here `casfs fsck` reporting a
/// store that does not exist.
#[test]
fn a_panic_in_the_casfs_binary_aborts_it_with_sigabrt() {
    use std::os::unix::process::ExitStatusExt;
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("this test needs /dev/full (a write to it fails with ENOSPC)");
    let td = TestDir::new("panic-abort");
    let out = std::process::Command::new(CASFS_BIN)
        .args(["fsck", "--store"])
        .arg(td.path("no-such-store"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(full)
        .output()
        .expect("run casfs fsck");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "casfs panicked without aborting ({}): build it with panic = \"abort\"",
        out.status
    );
}

#[test]
fn daemon_exits_zero_and_unmounts_on_umount_sigterm_and_sigint() {
    let td = TestDir::new("lifecycle");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let a = pattern(40, 30_000);
    let b = pattern(41, 30_000);
    let c = pattern(42, 30_000);

    // 1. Plain `umount` (what an operator or systemd does).
    let mut m = Mount::start(&store, &mp, &[]);
    mkdir(&mp.join("d"));
    publish(&mp.join("d"), "a.tmp", &result_name(1), &a);
    let out = system_umount(&mp);
    assert!(
        out.status.success(),
        "umount {mp:?} failed:\n{}",
        output_text(&out)
    );
    let st = m.wait_exit(EXIT_TIMEOUT_S);
    assert!(
        st.success(),
        "daemon exited with {st} after umount (expected 0):\n{}",
        m.log()
    );
    assert!(!is_mounted(&mp), "{mp:?} still mounted after umount");
    drop(m);

    // 2. SIGTERM.
    let mut m = Mount::start(&store, &mp, &[]);
    assert!(
        fs::read(mp.join("d").join(result_name(1))).unwrap() == a,
        "lost a result across umount"
    );
    publish(&mp.join("d"), "b.tmp", &result_name(2), &b);
    m.signal(libc::SIGTERM);
    let st = m.wait_exit(EXIT_TIMEOUT_S);
    assert!(
        st.success(),
        "daemon exited with {st} on SIGTERM (expected 0):\n{}",
        m.log()
    );
    assert!(
        !is_mounted(&mp),
        "{mp:?} still mounted after the daemon exited on SIGTERM"
    );
    drop(m);

    // 3. SIGINT.
    let mut m = Mount::start(&store, &mp, &[]);
    assert!(
        fs::read(mp.join("d").join(result_name(2))).unwrap() == b,
        "lost a result across SIGTERM"
    );
    publish(&mp.join("d"), "c.tmp", &result_name(3), &c);
    m.signal(libc::SIGINT);
    let st = m.wait_exit(EXIT_TIMEOUT_S);
    assert!(
        st.success(),
        "daemon exited with {st} on SIGINT (expected 0):\n{}",
        m.log()
    );
    assert!(
        !is_mounted(&mp),
        "{mp:?} still mounted after the daemon exited on SIGINT"
    );
    drop(m);

    // 4. `casfs unmount`.
    let mut m = Mount::start(&store, &mp, &[]);
    let d = mp.join("d");
    assert!(fs::read(d.join(result_name(1))).unwrap() == a);
    assert!(fs::read(d.join(result_name(2))).unwrap() == b);
    assert!(
        fs::read(d.join(result_name(3))).unwrap() == c,
        "lost a result across SIGINT"
    );
    m.unmount();
}

/// ccache's LRU touch (`utimensat` on a result) is written in batches
/// (`store/touches.rs`): seen at once, kept by an unmount, and by a
/// `kill -9` once the touch writer's period has passed.
#[test]
fn touches_are_seen_at_once_and_survive_unmount_and_a_later_kill9() {
    let td = TestDir::new("touches");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&store, &mp, &[]);
    let d = mp.join("t");
    mkdir(&d);
    publish(&d, "a.tmp", &result_name(1), &pattern(1, 4000));
    publish(&d, "b.tmp", &result_name(2), &pattern(2, 4000));
    let (a, b) = (d.join(result_name(1)), d.join(result_name(2)));
    let old = timespec(1_000_000_000, 0);
    utimensat(&a, Some([old, old])).unwrap();
    assert_eq!(mtime_ns(&a), 1_000_000_000_000_000_000);
    m.unmount();
    drop(m);

    let mut m = Mount::start(&store, &mp, &[]);
    assert_eq!(
        mtime_ns(&a),
        1_000_000_000_000_000_000,
        "an explicit time lost by an unmount"
    );
    let before = now_ns();
    utimensat(&b, None).unwrap();
    let touched = mtime_ns(&b);
    assert!(touched >= before, "a touch is seen at once");
    // The touch writer runs every second; once nothing is pending, a
    // kill -9 keeps the touch.
    let started = Instant::now();
    while m.counter("touches_pending") > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the touch writer wrote nothing in 60 s"
        );
        thread::sleep(Duration::from_millis(100));
    }
    m.kill9();
    clear_dead_mount(&mp);
    drop(m);

    let mut m = Mount::start(&store, &mp, &[]);
    assert_eq!(
        mtime_ns(&b),
        touched,
        "a touch written by the touch writer was lost by kill -9"
    );
    assert_eq!(mtime_ns(&a), 1_000_000_000_000_000_000);
    m.unmount();
}

#[test]
fn acknowledged_publications_survive_kill9() {
    let td = TestDir::new("kill9");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    const RESULTS: usize = 60;
    const MANIFESTS: usize = 10;

    let mut m = Mount::start(&store, &mp, &[]);
    let d = mp.join("k9");
    mkdir(&d);
    for i in 0..RESULTS {
        publish(
            &d,
            &format!("r{i}.tmp"),
            &result_name(i),
            &pattern(i as u64, 5_000 + i * 97),
        );
    }
    for i in 0..MANIFESTS {
        for v in 0..3 {
            publish(
                &d,
                &format!("m{i}-{v}.tmp"),
                &manifest_name(i),
                &pattern(1000 + i as u64 * 10 + v, 3_000),
            );
        }
    }
    // Every rename above has returned: all of it is acknowledged.
    m.kill9();

    clear_dead_mount(&mp);
    assert!(
        fs::read_dir(&mp)
            .map(|mut r| r.next().is_none())
            .unwrap_or(false),
        "the mountpoint is not an empty directory again after casfs unmount"
    );
    drop(m);

    let m = Mount::start(&store, &mp, &[]);
    let mut bad = Vec::new();
    for i in 0..RESULTS {
        match fs::read(d.join(result_name(i))) {
            Ok(v) if v == pattern(i as u64, 5_000 + i * 97) => {}
            Ok(v) => bad.push(format!(
                "{}: {} bytes, wrong content",
                result_name(i),
                v.len()
            )),
            Err(e) => bad.push(format!("{}: {e}", result_name(i))),
        }
    }
    for i in 0..MANIFESTS {
        match fs::read(d.join(manifest_name(i))) {
            Ok(v) if v == pattern(1000 + i as u64 * 10 + 2, 3_000) => {}
            Ok(v) => bad.push(format!(
                "{}: {} bytes, not the last acknowledged version",
                manifest_name(i),
                v.len()
            )),
            Err(e) => bad.push(format!("{}: {e}", manifest_name(i))),
        }
    }
    assert!(
        bad.is_empty(),
        "acknowledged publications lost or damaged by kill -9 ({} of {}):\n{}",
        bad.len(),
        RESULTS + MANIFESTS,
        bad.join("\n")
    );
    let names = list_dir(&d);
    let unexpected: Vec<&String> = names
        .iter()
        .filter(|n| !(n.ends_with('R') || n.ends_with('M')))
        .collect();
    assert!(
        unexpected.is_empty(),
        "names that were renamed away came back after kill -9: {unexpected:?}"
    );
    assert_eq!(
        names.len(),
        RESULTS + MANIFESTS,
        "entries after kill -9: {names:?}"
    );
    assert_eq!(m.counter("corrupt_blobs"), 0);

    // The reopened store is fully working: create-only still holds.
    publish(&d, "again.tmp", &result_name(0), b"newcomer after restart");
    assert!(fs::read(d.join(result_name(0))).unwrap() == pattern(0, 5_000));
    publish(&d, "new.tmp", &result_name(RESULTS), b"new after restart");
    assert_eq!(
        fs::read(d.join(result_name(RESULTS))).unwrap(),
        b"new after restart"
    );
}

/// Reads every regular file below `dir` (outside `tmp/`) to the end and runs
/// `ccache --inspect` on every result and manifest; returns what failed.
fn check_cache_entries(
    ccache: &Ccache,
    dir: &Path,
    failures: &mut Vec<String>,
    entries: &mut usize,
) {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            failures.push(format!("readdir {dir:?}: {e}"));
            return;
        }
    };
    for e in rd {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                failures.push(format!("readdir {dir:?}: {err}"));
                continue;
            }
        };
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(err) => {
                failures.push(format!("lstat {p:?}: {err}"));
                continue;
            }
        };
        if meta.is_dir() {
            if name != "tmp" {
                check_cache_entries(ccache, &p, failures, entries);
            }
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        if let Err(err) = fs::read(&p) {
            failures.push(format!("read {p:?}: {err}"));
            continue;
        }
        if name.ends_with('R') || name.ends_with('M') {
            *entries += 1;
            let out = ccache
                .command()
                .arg("--inspect")
                .arg(&p)
                .output()
                .expect("run ccache --inspect");
            if !out.status.success() {
                failures.push(format!(
                    "ccache --inspect {p:?} (a damaged entry is visible): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
}

#[test]
fn kill9_mid_ccache_build_then_remount_gives_gcc_identical_objects() {
    let td = TestDir::new("ccache-kill9");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let all_jobs = jobs(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let reference = td.dir("gcc-objects");
    gcc_reference(&all_jobs, &reference);

    let mut m = Mount::start(&store, &mp, &[]);
    let ccache_dir = mp.join("cc");
    mkdir(&ccache_dir);
    let ccache = Ccache::new(&ccache_dir, &td.root);
    ccache.zero_stats();

    // Build in parallel; kill -9 the daemon once a quarter of the compiles
    // have finished.
    let kill_after = all_jobs.len() / 4;
    let progress: Progress = Default::default();
    let crash_out = td.dir("objects-crash");
    let mut publications_at_kill = 0;
    let snapshot: Vec<(usize, bool)> = thread::scope(|s| {
        let build = s.spawn(|| {
            compile_all_with_progress(Some(&ccache), &all_jobs, &crash_out, 4, Some(&progress))
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        while progress.lock().unwrap().len() < kill_after
            && !build.is_finished()
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(2));
        }
        let snapshot = progress.lock().unwrap().clone();
        if let Some(v) = json_u64(
            &fs::read_to_string(m.casfs_file("stats.json")).unwrap_or_default(),
            "publications",
        ) {
            publications_at_kill = v;
        }
        m.kill9();
        // The compiles still running fail or fall back; either is fine.
        let _ = build.join().expect("build thread");
        snapshot
    });
    assert!(
        snapshot.len() < all_jobs.len(),
        "the whole build ({} compiles) finished before the daemon was killed; the test needs \
         a longer build",
        all_jobs.len()
    );
    let failed_before_kill: Vec<usize> = snapshot
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(i, _)| *i)
        .collect();
    assert!(
        failed_before_kill.is_empty(),
        "{} compiles failed while the daemon was still healthy (jobs {failed_before_kill:?})",
        failed_before_kill.len()
    );
    let acked: Vec<usize> = snapshot.iter().map(|(i, _)| *i).collect();
    assert!(!acked.is_empty(), "no compile finished before the kill");
    eprintln!(
        "killed the daemon after {} of {} compiles (publications counted: {publications_at_kill})",
        acked.len(),
        all_jobs.len()
    );

    // Clear the dead mount and reopen the same store.
    clear_dead_mount(&mp);
    drop(m);
    let m = Mount::start(&store, &mp, &[]);

    // Nothing half-written is visible: every entry reads and checks out.
    let mut failures = Vec::new();
    let mut entries = 0;
    check_cache_entries(&ccache, &ccache_dir, &mut failures, &mut entries);
    assert!(
        failures.is_empty(),
        "damaged or unreadable cache files after kill -9 and remount ({} of {entries} entries):\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every compile that finished before the kill published its entry: all hits.
    let acked_jobs: Vec<Job> = acked.iter().map(|&i| all_jobs[i].clone()).collect();
    let rest_jobs: Vec<Job> = (0..all_jobs.len())
        .filter(|i| !acked.contains(i))
        .map(|i| all_jobs[i].clone())
        .collect();
    ccache.zero_stats();
    let out = td.dir("objects-acked");
    let results = compile_all(Some(&ccache), &acked_jobs, &out, 4);
    assert_all_compiled(
        &results,
        "rebuild of the compiles acknowledged before kill -9",
    );
    assert_objects_identical(
        &acked_jobs,
        &out,
        &reference,
        "rebuild of acknowledged compiles",
    );
    let st = ccache.print_stats();
    assert_eq!(
        st.hits(),
        acked_jobs.len() as u64,
        "{} compiles had finished (their entries acknowledged) before kill -9; after remount \
         each must be a hit. ccache counters: {}",
        acked_jobs.len(),
        st.summary()
    );

    // The others recompile or hit; either way gcc's objects.
    ccache.zero_stats();
    let out = td.dir("objects-rest");
    let results = compile_all(Some(&ccache), &rest_jobs, &out, 4);
    assert_all_compiled(&results, "rebuild of the compiles cut short by kill -9");
    assert_objects_identical(
        &rest_jobs,
        &out,
        &reference,
        "rebuild of interrupted compiles",
    );
    let st = ccache.print_stats();
    assert_eq!(
        st.hits() + st.misses(),
        rest_jobs.len() as u64,
        "every interrupted compile is a hit or a miss; ccache counters: {}",
        st.summary()
    );

    // And now the cache is complete.
    ccache.zero_stats();
    let out = td.dir("objects-final");
    let results = compile_all(Some(&ccache), &all_jobs, &out, 4);
    assert_all_compiled(&results, "final warm build");
    assert_objects_identical(&all_jobs, &out, &reference, "final warm build");
    let st = ccache.print_stats();
    assert_eq!(
        (st.direct_hits(), st.misses()),
        (all_jobs.len() as u64, 0),
        "final warm build after the crash must be all direct hits; ccache counters: {}",
        st.summary()
    );
    assert_eq!(
        m.counter("corrupt_blobs"),
        0,
        "corrupt blobs after kill -9:\n{}",
        m.stats_json()
    );
}

/// ccache's counters (`stats` files) and configuration (`ccache.conf`) are
/// host-local files in the host-local tree: a `kill -9` of the daemon and a
/// remount keep them as they were (ext4 keeps what was written), and its
/// lock files and temporaries leave no record in the metadata database.
#[test]
fn ccache_counters_and_configuration_survive_kill9_and_remount() {
    let td = TestDir::new("ccache-local-kill9");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let all_jobs = jobs(&[1, 2]);
    let mut m = Mount::start(&store, &mp, &[]);
    let ccache_dir = mp.join("cc");
    mkdir(&ccache_dir);
    let ccache = Ccache::new(&ccache_dir, &td.root);
    ccache.zero_stats();
    // (The tests' ccache reads its configuration from CCACHE_CONFIGPATH;
    // this one is the file an operator leaves in the cache directory.)
    fs::write(ccache_dir.join("ccache.conf"), b"max_files = 123456\n").unwrap();
    let out = td.dir("objects-cold");
    assert_all_compiled(
        &compile_all(Some(&ccache), &all_jobs, &out, 2),
        "cold build",
    );
    let out = td.dir("objects-warm");
    assert_all_compiled(
        &compile_all(Some(&ccache), &all_jobs, &out, 2),
        "warm build",
    );
    let before = ccache.print_stats();
    let conf = fs::read(ccache_dir.join("ccache.conf")).expect("ccache.conf in the mount");
    assert_eq!(before.hits(), all_jobs.len() as u64, "{}", before.summary());
    assert!(
        store.join("local").is_dir(),
        "host-local files live in the store's host-local tree"
    );
    m.kill9();
    clear_dead_mount(&mp);
    drop(m);

    let _m = Mount::start(&store, &mp, &[]);
    let after = ccache.print_stats();
    assert_eq!(
        (after.hits(), after.misses()),
        (before.hits(), before.misses()),
        "ccache's counters after kill -9 and remount: {} (before: {})",
        after.summary(),
        before.summary()
    );
    assert_eq!(
        fs::read(ccache_dir.join("ccache.conf")).expect("ccache.conf after remount"),
        conf,
        "ccache.conf after kill -9 and remount"
    );
}
