//! Real-mount tests of casfs's file semantics, through the kernel with std::fs
//! and libc: create-only results (rename onto an existing result returns 0
//! and keeps the first content, counted as a conflict; link onto one fails
//! with the kernel's EEXIST and keeps it too; concurrent publishers converge;
//! readers only ever see whole contents), in-place results visible
//! only at close, mutable classes (stats, manifests, config, tmp/) replaced as
//! on a local disk, ≥4.13 hex names classified by their entry header, symlink
//! locks, mtimes from the daemon's clock (touches visible at once, never
//! backwards), POSIX errnos, open descriptors stable across unlink and
//! replace, content-addressed dedup, the read-only `.casfs/` directory,
//! BLAKE3 verification of corrupted blobs, and refusal of bad stores and
//! mountpoints.
//!
//! Every test has its own store and mountpoint, so they run in parallel.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;

/// A ccache ≤4.12 style result name (base32hex hash + `R`).
const RESULT_NAME: &str = "0123456789abcdefghijklmnopqrR";

fn mounted(tag: &str) -> (TestDir, Mount) {
    let td = TestDir::new(tag);
    let m = Mount::start(&td.store(), &td.mountpoint("mnt"), &[]);
    (td, m)
}

fn unit<T>(r: std::io::Result<T>) -> std::io::Result<()> {
    r.map(|_| ())
}

fn mkdir(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir -p {p:?}: {e}"));
}

// ---------------------------------------------------------------------------
// Create-only results
// ---------------------------------------------------------------------------

const WRITERS: usize = 16;
const ROUNDS: usize = 20;
const READERS: usize = 4;

/// The content writer `w` publishes in round `r`: a header naming it, then
/// pseudo-random bytes; lengths differ so a mix of two contents is detectable.
fn storm_content(w: usize, r: usize) -> Vec<u8> {
    let len = 3000 + w * 517 + r * 131;
    let mut v = format!("writer={w:02} round={r:03} len={len:06}\n").into_bytes();
    let body = pattern((w * 1000 + r) as u64, len - v.len());
    v.extend_from_slice(&body);
    v
}

/// Which (writer, round) produced `bytes`, if they are exactly one whole content.
fn identify(bytes: &[u8]) -> Option<(usize, usize)> {
    let head = std::str::from_utf8(bytes.get(..30)?).ok()?;
    let w: usize = head.get(7..9)?.parse().ok()?;
    let r: usize = head.get(16..19)?.parse().ok()?;
    (w < WRITERS && r < ROUNDS && storm_content(w, r) == bytes).then_some((w, r))
}

#[test]
fn rename_onto_existing_result_keeps_first_writer() {
    let (_td, m) = mounted("storm");
    let d = m.mountpoint.join("d");
    mkdir(&d);
    let target = d.join(RESULT_NAME);
    let conflicts_before = m.counter("conflicts");

    let done = AtomicBool::new(false);
    let barrier = Barrier::new(WRITERS + READERS);
    let seen: Mutex<BTreeSet<(usize, usize)>> = Mutex::new(BTreeSet::new());
    let problems: Mutex<Vec<String>> = Mutex::new(Vec::new());

    thread::scope(|s| {
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (d, target, barrier, problems) = (&d, &target, &barrier, &problems);
            writers.push(s.spawn(move || {
                barrier.wait();
                for r in 0..ROUNDS {
                    let tmp = d.join(format!("w{w:02}-r{r:03}.tmp"));
                    if let Err(e) = fs::write(&tmp, storm_content(w, r)) {
                        problems.lock().unwrap().push(format!("write {tmp:?}: {e}"));
                        continue;
                    }
                    if let Err(e) = fs::rename(&tmp, target) {
                        problems.lock().unwrap().push(format!(
                            "rename {tmp:?} onto the result: {e} ({}); a rename onto an \
                             existing result must return 0",
                            errno_name(e.raw_os_error().unwrap_or(0))
                        ));
                    }
                }
            }));
        }
        for _ in 0..READERS {
            let (target, barrier, problems, seen, done) =
                (&target, &barrier, &problems, &seen, &done);
            s.spawn(move || {
                barrier.wait();
                let mut published = false;
                let mut reads = 0u64;
                // At least a few reads after the writers finish, so a slow
                // start still checks the published content.
                let mut after_done = 0;
                while after_done < 3 {
                    if done.load(Ordering::SeqCst) {
                        after_done += 1;
                    }
                    reads += 1;
                    match fs::read(target) {
                        Ok(bytes) => match identify(&bytes) {
                            Some(id) => {
                                published = true;
                                seen.lock().unwrap().insert(id);
                            }
                            None => problems.lock().unwrap().push(format!(
                                "read #{reads} returned {} bytes that are not one whole \
                                 content; first bytes: {:?}",
                                bytes.len(),
                                String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
                            )),
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !published => {}
                        Err(e) => problems.lock().unwrap().push(format!(
                            "read #{reads} failed: {e} ({}){}",
                            errno_name(e.raw_os_error().unwrap_or(0)),
                            if published {
                                " after the name had been published"
                            } else {
                                ""
                            }
                        )),
                    }
                }
            });
        }
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
    });

    let problems = problems.into_inner().unwrap();
    assert!(
        problems.is_empty(),
        "{} problems during the rename storm (first 20):\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    let final_bytes = fs::read(&target).expect("read the result after the storm");
    let winner = identify(&final_bytes).unwrap_or_else(|| {
        panic!(
            "final content ({} bytes) is not one whole content",
            final_bytes.len()
        )
    });
    assert_eq!(
        winner.1, 0,
        "final content is writer {} round {}: the first publication of a name is some \
         writer's round 0, later renames must not replace it",
        winner.0, winner.1
    );
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter().all(|id| *id == winner),
        "readers saw {} different contents {seen:?}; a published result must never change \
         (final: {winner:?})",
        seen.len()
    );

    let names = list_dir(&d);
    assert_eq!(
        names,
        vec![RESULT_NAME.to_string()],
        "after the storm the directory must hold only the result (every rename removes \
         its source name, also when the newcomer is discarded)"
    );

    let conflicts = m.counter("conflicts") - conflicts_before;
    let expected = (WRITERS * ROUNDS - 1) as u64;
    assert_eq!(
        conflicts,
        expected,
        "{} renames onto one result name: the first publishes, each of the other {expected} \
         must count one conflict",
        WRITERS * ROUNDS
    );
}

/// link() onto an existing name never reaches a FUSE daemon: the kernel's
/// VFS (`filename_create` in `linkat`) finds the name and fails with EEXIST
/// itself. So through a mount the "link returns 0" half of the create-only
/// promise cannot hold; what casfs must (and can) give is what the
/// link()-based safe-rename idiom expects: EEXIST, and the first content
/// stays. A link() onto a free result name publishes the source's content.
#[test]
fn link_onto_existing_result_fails_eexist_and_keeps_first_content() {
    let (_td, m) = mounted("link");
    let d = m.mountpoint.join("ab");
    mkdir(&d);
    let first = pattern(1, 10_000);
    let second = pattern(2, 12_000);
    publish(&d, "first.tmp", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaR", &first);
    let result = d.join("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaR");
    fs::write(d.join("second.tmp"), &second).unwrap();

    let e = errno_of(
        fs::hard_link(d.join("second.tmp"), &result),
        "link() onto an existing result",
    );
    assert_eq!(
        e,
        libc::EEXIST,
        "link() onto an existing result gave {}",
        errno_name(e)
    );
    assert!(
        fs::read(&result).unwrap() == first,
        "link() onto an existing result replaced its content"
    );
    assert!(
        fs::read(d.join("second.tmp")).unwrap() == second,
        "link() must leave its source name as it was"
    );

    let fresh = d.join("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbR");
    let published_before = m.counter("publications");
    fs::hard_link(d.join("second.tmp"), &fresh).expect("link() onto a free result name");
    fs::remove_file(d.join("second.tmp")).expect("unlink the link source");
    assert!(
        fs::read(&fresh).unwrap() == second,
        "a result published by link() must hold the source's content"
    );
    assert_eq!(
        m.counter("publications") - published_before,
        1,
        "link() onto a free result name is one publication"
    );
    assert_eq!(
        list_dir(&d),
        vec![
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaR".to_string(),
            "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbR".to_string()
        ]
    );
}

#[test]
fn rename_noreplace_onto_existing_name_fails_eexist() {
    let (_td, m) = mounted("noreplace");
    let d = m.mountpoint.join("c3");
    mkdir(&d);
    let a = pattern(3, 5000);
    publish(&d, "a.tmp", "ccccccccccccccccccccccccccccccR", &a);
    let result = d.join("ccccccccccccccccccccccccccccccR");
    let newcomer = d.join("new.tmp");
    fs::write(&newcomer, b"newcomer").unwrap();

    let e = errno_of(
        renameat2(&newcomer, &result, libc::RENAME_NOREPLACE),
        "renameat2(RENAME_NOREPLACE) onto an existing result",
    );
    assert_eq!(
        e,
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing result gave {}",
        errno_name(e)
    );
    assert!(
        fs::read(&result).unwrap() == a,
        "failed RENAME_NOREPLACE changed the result"
    );
    assert_eq!(
        fs::read(&newcomer).unwrap(),
        b"newcomer",
        "failed RENAME_NOREPLACE moved its source"
    );

    let local = d.join("other.tmp");
    fs::write(&local, b"other").unwrap();
    let e = errno_of(
        renameat2(&newcomer, &local, libc::RENAME_NOREPLACE),
        "renameat2(RENAME_NOREPLACE) onto an existing local file",
    );
    assert_eq!(
        e,
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing local file gave {}",
        errno_name(e)
    );
    assert_eq!(fs::read(&local).unwrap(), b"other");

    let manifest = d.join("ccccccccccccccccccccccccccccccM");
    publish(
        &d,
        "m.tmp",
        "ccccccccccccccccccccccccccccccM",
        b"manifest v1",
    );
    let e = errno_of(
        renameat2(&newcomer, &manifest, libc::RENAME_NOREPLACE),
        "renameat2(RENAME_NOREPLACE) onto an existing manifest",
    );
    assert_eq!(
        e,
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing manifest gave {}",
        errno_name(e)
    );
    assert_eq!(fs::read(&manifest).unwrap(), b"manifest v1");

    let free = d.join("ddddddddddddddddddddddddddddddR");
    renameat2(&newcomer, &free, libc::RENAME_NOREPLACE).expect("RENAME_NOREPLACE onto a free name");
    assert_eq!(fs::read(&free).unwrap(), b"newcomer");
    assert!(
        !newcomer.exists(),
        "source of a successful rename still exists"
    );
}

#[test]
fn result_created_in_place_is_invisible_until_close() {
    let (_td, m) = mounted("inplace");
    let d = m.mountpoint.join("e5");
    mkdir(&d);
    let name = d.join("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeR");
    let content = pattern(5, 300_000);

    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&name)
        .expect("create a result directly under its final name");
    f.write_all(&content[..100_000]).unwrap();
    f.flush().unwrap();
    match fs::read(&name) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(b) => panic!(
            "a result being written under its final name is visible before close ({} of {} \
             bytes readable)",
            b.len(),
            content.len()
        ),
        Err(e) => panic!("reading a result still being written: expected ENOENT, got {e}"),
    }
    assert!(
        fs::metadata(&name).is_err(),
        "stat() finds a result that is still being written"
    );
    f.write_all(&content[100_000..]).unwrap();
    drop(f);

    let got = fs::read(&name).expect("a result created in place is visible once closed");
    assert!(
        got == content,
        "result created in place: read back {} bytes, differs from the {} written",
        got.len(),
        content.len()
    );
}

#[test]
fn hex_named_entries_are_classified_by_their_header() {
    let (_td, m) = mounted("hexnames");
    // ccache ≥ 4.13's layout: two one-digit level directories, 38 digits.
    let d = m.mountpoint.join("3/f");
    mkdir(&d);
    let header = |ty: u8, body: &str| {
        let mut v = vec![0xcc, 0xac, 0x01, ty];
        v.extend_from_slice(body.as_bytes());
        v.extend_from_slice(&pattern(ty as u64 + 7, 2000));
        v
    };
    let result = "0a1b2c3d4e5f60718293a4b5c6d7e80a1b2c3d";
    let manifest = "7c1d2e3f405162738495a6b7c8d9eaf07c1d2e";

    let conflicts_before = m.counter("conflicts");
    let r1 = header(0, "result one");
    let r2 = header(0, "result two");
    publish(&d, "r1.tmp", result, &r1);
    publish(&d, "r2.tmp", result, &r2);
    assert!(
        fs::read(d.join(result)).unwrap() == r1,
        "a hex-named file with header cc ac 01 00 is a result: a second rename must keep the \
         first content"
    );
    assert_eq!(
        m.counter("conflicts") - conflicts_before,
        1,
        "the discarded second rename onto a hex-named result must count one conflict"
    );

    let m1 = header(1, "manifest one");
    let m2 = header(1, "manifest two");
    publish(&d, "m1.tmp", manifest, &m1);
    publish(&d, "m2.tmp", manifest, &m2);
    assert!(
        fs::read(d.join(manifest)).unwrap() == m2,
        "a hex-named file with header cc ac 01 01 is a manifest: a second rename must replace it"
    );
    assert_eq!(
        m.counter("conflicts") - conflicts_before,
        1,
        "replacing a manifest is not a conflict"
    );
    assert_eq!(list_dir(&d), vec![result.to_string(), manifest.to_string()]);
}

// ---------------------------------------------------------------------------
// Mutable classes
// ---------------------------------------------------------------------------

#[test]
fn mutable_classes_are_replaced_last_writer_wins() {
    let (_td, m) = mounted("mutable");
    let root = &m.mountpoint;
    let conflicts_before = m.counter("conflicts");
    // (path, local: also rewritable in place like any POSIX file)
    let names: [(&str, bool); 9] = [
        ("stats", true),
        ("1/stats", true),
        ("1/2/stats", true),
        ("ab/0123456789abcdefghijklmnopqM", false),
        ("ccache.conf", true),
        ("1/CACHEDIR.TAG", true),
        ("tmp/scratchR", true),
        ("cc/tmp/deep/scratchR", true),
        ("cc/tmp/0123456789abcdefghijklmnopqR", true),
    ];
    for (rel, local) in names {
        let path = root.join(rel);
        let dir = path.parent().unwrap();
        mkdir(dir);
        let file = path.file_name().unwrap().to_str().unwrap();
        for v in 1..=3 {
            let content = format!("{rel} version {v}\n").into_bytes();
            publish(dir, &format!("{file}.{v}.tmp"), file, &content);
            let got =
                fs::read(&path).unwrap_or_else(|e| panic!("read {rel} after rename {v}: {e}"));
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&content),
                "rename onto {rel:?} (version {v}) did not replace it: last writer must win"
            );
        }
        if local {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {rel} for rewrite: {e}"));
            f.write_all(b"rewritten in place\n").unwrap();
            drop(f);
            let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(b"appended\n").unwrap();
            drop(f);
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                "rewritten in place\nappended\n",
                "{rel:?} is a local file and must be rewritable in place"
            );
        }
        let leftovers: Vec<String> = list_dir(dir)
            .into_iter()
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary names left in {dir:?}: {leftovers:?}"
        );
    }
    assert_eq!(
        m.counter("conflicts") - conflicts_before,
        0,
        "replacing mutable-class files must not count conflicts"
    );
}

#[test]
fn symlink_lock_can_be_created_read_and_removed() {
    let (_td, m) = mounted("lock");
    let d = m.mountpoint.join("8");
    mkdir(&d);
    let lock = d.join("stats.lock");
    let owner = "buildhost-4667-139663360968512-1795249630.1795249630625055566";
    std::os::unix::fs::symlink(owner, &lock).expect("symlink() a lock");
    assert_eq!(
        fs::read_link(&lock).expect("readlink the lock").to_str(),
        Some(owner)
    );
    assert!(fs::symlink_metadata(&lock)
        .unwrap()
        .file_type()
        .is_symlink());

    let e = errno_of(
        std::os::unix::fs::symlink("other-owner", &lock),
        "symlink() onto a held lock",
    );
    assert_eq!(e, libc::EEXIST, "taking a held lock gave {}", errno_name(e));
    assert_eq!(
        fs::read_link(&lock).unwrap().to_str(),
        Some(owner),
        "lock owner changed"
    );

    fs::remove_file(&lock).expect("unlink the lock");
    let e = errno_of(fs::symlink_metadata(&lock), "lstat a released lock");
    assert_eq!(
        e,
        libc::ENOENT,
        "released lock: lstat gave {}",
        errno_name(e)
    );

    std::os::unix::fs::symlink("second-owner", &lock).expect("take the lock again");
    assert_eq!(fs::read_link(&lock).unwrap().to_str(), Some("second-owner"));
    fs::remove_file(&lock).unwrap();
    assert!(
        list_dir(&d).is_empty(),
        "lock directory not empty: {:?}",
        list_dir(&d)
    );
}

// ---------------------------------------------------------------------------
// Mtimes
// ---------------------------------------------------------------------------

#[test]
fn alive_touch_is_visible_to_the_next_stat() {
    let (_td, m) = mounted("alive");
    let d = m.mountpoint.join("8");
    mkdir(&d);
    let alive = d.join("stats.alive");
    fs::write(&alive, b"").unwrap();
    let mut prev = mtime_ns(&alive);
    let now_pair = [timespec(0, libc::UTIME_NOW), timespec(0, libc::UTIME_NOW)];
    for i in 0..40 {
        let wall_before = now_ns();
        let times = if i % 2 == 0 { None } else { Some(now_pair) };
        utimensat(&alive, times).unwrap_or_else(|e| panic!("utimensat #{i} on .alive: {e}"));
        let t = mtime_ns(&alive);
        assert!(
            t > prev,
            "touch #{i} of {alive:?} not visible to the next stat: mtime {t} after touch, was \
             {prev} (must strictly increase)"
        );
        assert!(
            t >= wall_before,
            "touch #{i}: mtime {t} is behind the wall clock before the touch ({wall_before}); \
             the daemon's clock is never behind wall time"
        );
        prev = t;
    }
}

#[test]
fn explicit_times_are_kept_and_touches_come_from_the_clock() {
    let (_td, m) = mounted("mtime");
    let d = m.mountpoint.join("4f");
    mkdir(&d);
    fs::write(d.join("x.alive"), b"").unwrap();
    publish(&d, "r.tmp", "ffffffffffffffffffffffffffffffR", b"result");
    publish(&d, "m.tmp", "ffffffffffffffffffffffffffffffM", b"manifest");
    fs::write(d.join("plain.tmp"), b"local").unwrap();

    let s = 1_000_000_000_i128 * 1_000_000_000;
    let old = [timespec(1_000_000_000, 7), timespec(1_000_000_000, 123)];
    let future_s = (now_ns() / 1_000_000_000) as i64 + 86_400;
    let future = [timespec(future_s, 0), timespec(future_s, 5)];
    let atime_ns = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        m.atime() as i128 * 1_000_000_000 + m.atime_nsec() as i128
    };
    for name in [
        "x.alive",
        "ffffffffffffffffffffffffffffffR",
        "ffffffffffffffffffffffffffffffM",
        "plain.tmp",
    ] {
        let p = d.join(name);
        // An explicit time is stored as given, access time included.
        utimensat(&p, Some(old)).unwrap_or_else(|e| panic!("utimensat(2001) on {name}: {e}"));
        assert_eq!(mtime_ns(&p), s + 123, "{name}: explicit mtime");
        assert_eq!(atime_ns(&p), s + 7, "{name}: explicit atime");
        utimensat(&p, Some(future)).unwrap_or_else(|e| panic!("utimensat(+1 day) on {name}: {e}"));
        assert_eq!(
            mtime_ns(&p),
            future_s as i128 * 1_000_000_000 + 5,
            "{name}: future"
        );
        // UTIME_NOW is a touch on the daemon's clock.
        utimensat(&p, Some(old)).unwrap();
        let wall_before = now_ns();
        utimensat(&p, None).unwrap();
        let t = mtime_ns(&p);
        assert!(
            t >= wall_before,
            "{name}: a touch to now gave {t} < {wall_before}"
        );
        assert_eq!(atime_ns(&p), t, "{name}: a touch sets both times");
        // touch(1) with -t, -m and -a.
        let run = |args: &[&str]| {
            let out = Command::new("touch").args(args).arg(&p).output().unwrap();
            assert!(
                out.status.success(),
                "touch {args:?} {name}: {}",
                output_text(&out)
            );
        };
        run(&["-t", "200102030405.06"]);
        let t1 = mtime_ns(&p);
        assert_eq!(atime_ns(&p), t1, "{name}: touch -t sets both");
        run(&["-a", "-d", "@1500000000"]);
        assert_eq!(
            atime_ns(&p),
            1_500_000_000 * 1_000_000_000,
            "{name}: touch -a"
        );
        assert_eq!(mtime_ns(&p), t1, "{name}: touch -a keeps the mtime");
        run(&["-m", "-d", "@1600000000"]);
        assert_eq!(
            mtime_ns(&p),
            1_600_000_000 * 1_000_000_000,
            "{name}: touch -m"
        );
        assert_eq!(
            atime_ns(&p),
            1_500_000_000 * 1_000_000_000,
            "{name}: touch -m keeps atime"
        );
    }
    // A publication keeps a time the client set after the last write (as
    // `mv` keeps it on a local disk); one written after gets the clock's now.
    let src = d.join("pub.tmp");
    fs::write(&src, b"published later").unwrap();
    let _ = utimensat(&src, Some(old));
    fs::rename(&src, d.join("ggggggggggggggggggggggggggggggR")).unwrap();
    let t = mtime_ns(&d.join("ggggggggggggggggggggggggggggggR"));
    assert_eq!(
        t,
        1_000_000_000 * 1_000_000_000 + 123,
        "a dated file renamed into a result"
    );
    let src = d.join("pub2.tmp");
    fs::write(&src, b"published later").unwrap();
    let wall_before = now_ns();
    fs::rename(&src, d.join("hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhR")).unwrap();
    let t = mtime_ns(&d.join("hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhR"));
    assert!(
        t >= wall_before,
        "a freshly published result has mtime {t}, older than the wall clock before its \
         rename ({wall_before})"
    );
}

// ---------------------------------------------------------------------------
// errno
// ---------------------------------------------------------------------------

#[test]
fn posix_errors_have_the_right_errno() {
    let (_td, m) = mounted("errno");
    let d = m.mountpoint.join("err");
    mkdir(&d);
    let file = d.join("file.tmp");
    fs::write(&file, b"x").unwrap();
    publish(&d, "r.tmp", "rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrR", b"result");
    let result = d.join("rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrR");
    let sub = d.join("sub");
    mkdir(&sub);
    fs::write(sub.join("inside.tmp"), b"y").unwrap();
    let empty = d.join("empty");
    mkdir(&empty);
    let long = "n".repeat(252) + ".tmp"; // 256 bytes
    let max = "m".repeat(251) + ".tmp"; // 255 bytes

    let mut failures = Vec::new();
    let mut check = |what: &str, r: std::io::Result<()>, want: i32| match r {
        Ok(()) => failures.push(format!("{what}: succeeded, want {}", errno_name(want))),
        Err(e) => {
            let got = e.raw_os_error().unwrap_or(0);
            if got != want {
                failures.push(format!(
                    "{what}: got {} ({e}), want {}",
                    errno_name(got),
                    errno_name(want)
                ));
            }
        }
    };

    // ENOENT
    check(
        "open missing file",
        unit(fs::File::open(d.join("missing.tmp"))),
        libc::ENOENT,
    );
    check(
        "stat missing result",
        unit(fs::metadata(d.join("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzR"))),
        libc::ENOENT,
    );
    check(
        "unlink missing",
        fs::remove_file(d.join("missing.tmp")),
        libc::ENOENT,
    );
    check(
        "readdir missing dir",
        unit(fs::read_dir(d.join("nodir"))),
        libc::ENOENT,
    );
    check(
        "rename missing source",
        fs::rename(d.join("missing.tmp"), d.join("x.tmp")),
        libc::ENOENT,
    );
    check(
        "create in missing dir",
        unit(fs::File::create(d.join("nodir/x.tmp"))),
        libc::ENOENT,
    );
    // EEXIST
    check(
        "O_CREAT|O_EXCL on existing local file",
        unit(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file),
        ),
        libc::EEXIST,
    );
    check(
        "O_CREAT|O_EXCL on existing result",
        unit(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&result),
        ),
        libc::EEXIST,
    );
    check("mkdir existing dir", fs::create_dir(&sub), libc::EEXIST);
    check(
        "mkdir over existing file",
        fs::create_dir(&file),
        libc::EEXIST,
    );
    // ENOTEMPTY
    check("rmdir non-empty dir", fs::remove_dir(&sub), libc::ENOTEMPTY);
    check(
        "rename dir onto non-empty dir",
        fs::rename(&empty, &sub),
        libc::ENOTEMPTY,
    );
    // ENAMETOOLONG
    check(
        "create 256-byte name",
        unit(fs::File::create(d.join(&long))),
        libc::ENAMETOOLONG,
    );
    check(
        "mkdir 256-byte name",
        fs::create_dir(d.join(&long)),
        libc::ENAMETOOLONG,
    );
    check(
        "stat 256-byte name",
        unit(fs::metadata(d.join(&long))),
        libc::ENAMETOOLONG,
    );
    // EISDIR
    check(
        "open dir for writing",
        unit(fs::OpenOptions::new().write(true).open(&sub)),
        libc::EISDIR,
    );
    check("unlink a dir", fs::remove_file(&empty), libc::EISDIR);
    check(
        "rename file onto dir",
        fs::rename(&file, &empty),
        libc::EISDIR,
    );
    // ENOTDIR
    check(
        "open file/x",
        unit(fs::File::open(file.join("x"))),
        libc::ENOTDIR,
    );
    check(
        "mkdir file/x",
        fs::create_dir(file.join("x")),
        libc::ENOTDIR,
    );
    check("rmdir a file", fs::remove_dir(&file), libc::ENOTDIR);
    check(
        "rename dir onto file",
        fs::rename(&empty, &file),
        libc::ENOTDIR,
    );
    check("readdir a file", unit(fs::read_dir(&file)), libc::ENOTDIR);

    // A 255-byte name is allowed.
    if let Err(e) = fs::write(d.join(&max), b"ok") {
        failures.push(format!("create a 255-byte name: {e} (NAME_MAX is 255)"));
    }
    assert!(failures.is_empty(), "wrong errno:\n{}", failures.join("\n"));
    // Nothing above changed what it must not change.
    assert_eq!(fs::read(&result).unwrap(), b"result");
    assert_eq!(fs::read(&file).unwrap(), b"x");
    assert!(sub.join("inside.tmp").exists() && empty.is_dir());
}

// ---------------------------------------------------------------------------
// Open files, dedup, .casfs
// ---------------------------------------------------------------------------

#[test]
fn open_descriptor_keeps_reading_after_unlink_and_replace() {
    let (_td, m) = mounted("openfd");
    let d = m.mountpoint.join("9a");
    mkdir(&d);
    let name = "9999999999999999999999999999999R";
    let a = pattern(10, 1 << 20);
    let b = pattern(11, 1 << 20);
    publish(&d, "a.tmp", name, &a);

    let mut f = fs::File::open(d.join(name)).expect("open the result");
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head).unwrap();
    assert!(head == a[..4096]);
    fs::remove_file(d.join(name)).expect("unlink a result");
    let e = errno_of(fs::metadata(d.join(name)), "stat an unlinked result");
    assert_eq!(e, libc::ENOENT);
    publish(&d, "b.tmp", name, &b);
    assert!(
        fs::read(d.join(name)).unwrap() == b,
        "the name now holds the new publication"
    );

    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap_or_else(|e| {
        panic!("an open descriptor failed after its name was unlinked and republished: {e}")
    });
    assert!(
        rest.len() == a.len() - 4096 && rest == a[4096..],
        "descriptor opened before unlink read {} bytes that are not the original content",
        rest.len()
    );
    let mut all = vec![0u8; a.len()];
    f.read_exact_at(&mut all, 0).unwrap();
    assert!(
        all == a,
        "pread from offset 0 on the old descriptor returned other bytes"
    );

    // Same for a manifest replaced by rename while open.
    let man = "9999999999999999999999999999999M";
    let m1 = pattern(12, 200_000);
    let m2 = pattern(13, 150_000);
    publish(&d, "m1.tmp", man, &m1);
    let mut g = fs::File::open(d.join(man)).unwrap();
    let mut first = vec![0u8; 1000];
    g.read_exact(&mut first).unwrap();
    publish(&d, "m2.tmp", man, &m2);
    let mut rest = Vec::new();
    g.read_to_end(&mut rest)
        .expect("read a replaced manifest through the old descriptor");
    first.extend_from_slice(&rest);
    assert!(
        first == m1,
        "descriptor on a replaced manifest read {} bytes, not its original content",
        first.len()
    );
    assert!(fs::read(d.join(man)).unwrap() == m2);
}

#[test]
fn identical_contents_are_stored_once() {
    let (td, m) = mounted("dedup");
    let d = m.mountpoint.join("dd");
    mkdir(&d);
    let content = pattern(20, 150_000);
    let keys = ["blobs", "bytes_stored", "bytes_saved", "publications"];
    let before = m.counters(&keys);
    publish(&d, "1.tmp", "d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1R", &content);
    publish(&d, "2.tmp", "d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2R", &content);
    let after = m.counters(&keys);
    let delta = |k: &str| after[k] - before[k];
    assert_eq!(
        delta("publications"),
        2,
        "two names published: {before:?} -> {after:?}"
    );
    assert_eq!(
        delta("blobs"),
        1,
        "one content under two names must be one blob: {before:?} -> {after:?}"
    );
    assert_eq!(
        delta("bytes_stored"),
        content.len() as u64,
        "bytes stored once: {before:?} -> {after:?}"
    );
    assert_eq!(
        delta("bytes_saved"),
        content.len() as u64,
        "second copy saved by dedup: {before:?} -> {after:?}"
    );
    for n in [
        "d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1R",
        "d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2R",
    ] {
        assert!(fs::read(d.join(n)).unwrap() == content);
    }
    let hash = blake3::hash(&content).to_hex().to_string();
    let blob = td.store().join("blobs").join(&hash[..2]).join(&hash);
    assert!(
        blob.is_file(),
        "the content's blob is not at {blob:?} (STORE/blobs/<2 hex>/<blake3>)"
    );
}

#[test]
fn casfs_dir_is_read_only_and_only_at_the_root() {
    let (_td, m) = mounted("casfsdir");
    let c = m.mountpoint.join(".casfs");
    for f in ["stats", "stats.json", "metrics"] {
        let text = read_text(&c.join(f));
        assert!(!text.trim().is_empty(), ".casfs/{f} is empty");
    }
    let stats_before = m.stats_text();
    let mut wrong = Vec::new();
    let mut must_fail = |what: &str, r: std::io::Result<()>| {
        if r.is_ok() {
            wrong.push(format!("{what} succeeded"));
        }
    };
    must_fail("write .casfs/stats", fs::write(c.join("stats"), b"forged"));
    must_fail(
        "open .casfs/stats.json for writing",
        fs::OpenOptions::new()
            .write(true)
            .open(c.join("stats.json"))
            .map(|_| ()),
    );
    must_fail(
        "create .casfs/new",
        fs::File::create(c.join("new")).map(|_| ()),
    );
    must_fail("mkdir .casfs/dir", fs::create_dir(c.join("dir")));
    must_fail("unlink .casfs/metrics", fs::remove_file(c.join("metrics")));
    must_fail(
        "rename .casfs/stats out",
        fs::rename(c.join("stats"), m.mountpoint.join("stolen")),
    );
    fs::write(m.mountpoint.join("x.tmp"), b"x").unwrap();
    must_fail(
        "rename onto .casfs/stats",
        fs::rename(m.mountpoint.join("x.tmp"), c.join("stats")),
    );
    must_fail(
        "symlink in .casfs",
        std::os::unix::fs::symlink("x", c.join("lnk")),
    );
    must_fail("rmdir .casfs", fs::remove_dir(&c));
    must_fail("rename .casfs", fs::rename(&c, m.mountpoint.join("moved")));
    assert!(
        wrong.is_empty(),
        ".casfs/ must be read-only:\n{}",
        wrong.join("\n")
    );
    assert!(!c.join("new").exists() && !c.join("dir").exists() && !c.join("lnk").exists());
    for f in ["stats", "stats.json", "metrics"] {
        assert!(c.join(f).is_file(), ".casfs/{f} disappeared");
    }
    assert!(
        !m.stats_text().contains("forged") && !stats_before.contains("forged"),
        ".casfs/stats took a write"
    );

    let sub = m.mountpoint.join("a/b");
    mkdir(&sub);
    for dir in [m.mountpoint.join("a"), sub.clone()] {
        let e = errno_of(
            fs::metadata(dir.join(".casfs")),
            "stat .casfs below the root",
        );
        assert_eq!(e, libc::ENOENT, "{dir:?}/.casfs: {}", errno_name(e));
        let e = errno_of(
            fs::metadata(dir.join(".casfs/stats")),
            "stat .casfs/stats below the root",
        );
        assert_eq!(e, libc::ENOENT, "{dir:?}/.casfs/stats: {}", errno_name(e));
    }
}

// ---------------------------------------------------------------------------
// Verification of blobs
// ---------------------------------------------------------------------------

#[test]
fn corrupted_blob_reads_as_eio_never_wrong_bytes() {
    let td = TestDir::new("corrupt");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let bad = pattern(30, 200_000);
    let good = pattern(31, 50_000);
    let bad_name = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0R";
    let good_name = "c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1R";
    {
        let mut m = Mount::start(&store, &mp, &[]);
        let d = m.mountpoint.join("c0");
        mkdir(&d);
        publish(&d, "bad.tmp", bad_name, &bad);
        publish(&d, "good.tmp", good_name, &good);
        assert!(fs::read(d.join(bad_name)).unwrap() == bad);
        m.unmount();
    }

    let hash = blake3::hash(&bad).to_hex().to_string();
    let blob = store.join("blobs").join(&hash[..2]).join(&hash);
    let on_disk = fs::read(&blob).unwrap_or_else(|e| {
        panic!(
            "the blob of a published result must be STORE/blobs/<2 hex>/<blake3> = {blob:?}: {e}"
        )
    });
    assert_eq!(
        blake3::hash(&on_disk).to_hex().to_string(),
        hash,
        "blob file {blob:?} does not hash to its name"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&blob).unwrap().permissions().mode();
        fs::set_permissions(&blob, fs::Permissions::from_mode(mode | 0o200)).unwrap();
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&blob)
            .unwrap();
        let at = on_disk.len() as u64 / 2;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[on_disk[at as usize] ^ 0x55]).unwrap();
        f.sync_all().unwrap();
        fs::set_permissions(&blob, fs::Permissions::from_mode(mode)).unwrap();
    }

    let m = Mount::start(&store, &mp, &["--verify-percent", "100"]);
    let d = m.mountpoint.join("c0");
    let corrupt_before = m.counter("corrupt_blobs");
    assert!(
        fs::read(d.join(good_name)).unwrap() == good,
        "an intact blob must still read correctly with --verify-percent 100"
    );

    let read = |n: &str| -> std::io::Result<Vec<u8>> {
        let mut f = fs::File::open(d.join(n))?;
        let mut v = Vec::new();
        f.read_to_end(&mut v)?;
        Ok(v)
    };
    match read(bad_name) {
        Ok(v) => panic!(
            "a corrupted blob was served: {} bytes read ({}), expected EIO",
            v.len(),
            if v == bad {
                "the original content, so the corruption went unnoticed"
            } else {
                "wrong bytes"
            }
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "reading a corrupted blob: got {e}, expected EIO"
        ),
    }
    assert!(
        m.counter("corrupt_blobs") > corrupt_before,
        "corrupt_blobs did not count the corrupted blob: {}",
        m.stats_json()
    );
    // Quarantined: later opens fail too (EIO or a miss), never bytes.
    if let Ok(v) = read(bad_name) {
        panic!("second read of a corrupted blob returned {} bytes", v.len());
    }
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[test]
fn second_daemon_on_same_store_is_refused() {
    let td = TestDir::new("twostores");
    let store = td.store();
    let m = Mount::start(&store, &td.mountpoint("mnt1"), &[]);
    let mp2 = td.mountpoint("mnt2");
    let out = expect_mount_refused(&store, &mp2, &[], "second daemon on the same store");
    let store_s = store.to_string_lossy();
    assert!(
        out.contains(store_s.as_ref()),
        "refusal of a second daemon must name the store {store_s:?}; it said:\n{out}"
    );
    assert!(!is_mounted(&mp2), "refused daemon left {mp2:?} mounted");
    // The first daemon is unharmed.
    fs::write(m.mountpoint.join("still.tmp"), b"alive").expect("first mount still works");
    assert!(m.counter("fuse_requests_total") > 0);
}

#[test]
fn bad_mountpoints_are_refused() {
    let td = TestDir::new("badmp");
    let missing = td.path("does-not-exist");
    let out = expect_mount_refused(&td.dir("s1"), &missing, &[], "mountpoint does not exist");
    assert!(
        out.contains(missing.to_string_lossy().as_ref()),
        "refusal of a missing mountpoint must name it; it said:\n{out}"
    );
    assert!(
        !missing.exists(),
        "a refused mount created the missing mountpoint"
    );

    let file = td.path("a-file");
    fs::write(&file, b"not a dir").unwrap();
    let out = expect_mount_refused(&td.dir("s2"), &file, &[], "mountpoint is a regular file");
    assert!(
        out.contains(file.to_string_lossy().as_ref()),
        "refusal of a file mountpoint must name it; it said:\n{out}"
    );
    assert_eq!(fs::read(&file).unwrap(), b"not a dir");

    let full = td.dir("full");
    fs::write(full.join("keep.txt"), b"precious").unwrap();
    let out = expect_mount_refused(
        &td.dir("s3"),
        &full,
        &[],
        "non-empty mountpoint without --force",
    );
    assert!(
        out.contains(full.to_string_lossy().as_ref()),
        "refusal of a non-empty mountpoint must name it; it said:\n{out}"
    );
    assert!(!is_mounted(&full));
    {
        let mut m = Mount::start(&td.dir("s3-force"), &full, &["--force"]);
        assert!(
            !m.mountpoint.join("keep.txt").exists(),
            "the mount hides what was below it"
        );
        m.unmount();
    }
    assert_eq!(fs::read(full.join("keep.txt")).unwrap(), b"precious");

    let busy = td.mountpoint("busy");
    let m = Mount::start(&td.dir("s4"), &busy, &[]);
    let out = expect_mount_refused(&td.dir("s5"), &busy, &[], "mountpoint already mounted");
    assert!(
        out.contains(busy.to_string_lossy().as_ref()),
        "refusal of a mounted mountpoint must name it; it said:\n{out}"
    );
    assert!(
        !m.stats_text().is_empty(),
        "the existing mount must keep working"
    );
}

#[test]
fn non_casfs_store_directory_is_refused() {
    let td = TestDir::new("badstore");
    let store = td.dir("not-a-store");
    fs::write(store.join("important.txt"), b"someone's data").unwrap();
    fs::create_dir(store.join("photos")).unwrap();
    let mp = td.mountpoint("mnt");
    let out = expect_mount_refused(&store, &mp, &[], "store directory holds unrelated files");
    assert!(
        out.contains(store.to_string_lossy().as_ref()),
        "refusal of a foreign store directory must name it; it said:\n{out}"
    );
    assert!(!is_mounted(&mp));
    assert_eq!(
        fs::read(store.join("important.txt")).unwrap(),
        b"someone's data"
    );
    assert_eq!(
        list_dir(&store),
        vec!["important.txt".to_string(), "photos".to_string()],
        "refused store was modified"
    );
}

// ---------------------------------------------------------------------------
// Permissions (checked by the daemon, as `default_permissions` would)
// ---------------------------------------------------------------------------

/// Runs `sh -c script` as `uid`:`gid` with exactly the supplementary
/// `groups`; returns (success, stderr).
fn sh_as(uid: u32, gid: u32, groups: &[u32], dir: &Path, script: &str) -> (bool, String) {
    let out = as_user(uid, gid, groups)
        .args(["--", "sh", "-c", script])
        .current_dir(dir)
        .output()
        .expect("run setpriv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn permissions_are_checked_by_the_daemon_for_other_users_and_groups() {
    use std::os::unix::fs::PermissionsExt;
    let td = TestDir::new("perm");
    let m = Mount::start(&td.store(), &td.mountpoint("mnt"), &["-o", "allow_other"]);
    let root = &m.mountpoint;
    let (nobody, nogroup) = user_ids("nobody");
    let daemon_gid = group_id("daemon");
    let set_mode = |p: &Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {p:?}: {e}"));
    };
    let chgrp = |p: &Path, gid: u32| {
        std::os::unix::fs::chown(p, None, Some(gid)).unwrap_or_else(|e| panic!("chgrp {p:?}: {e}"))
    };
    set_mode(root, 0o755);
    // A root-only file in a directory others may only search.
    mkdir(&root.join("priv"));
    fs::write(root.join("priv/secret"), b"secret").unwrap();
    set_mode(&root.join("priv/secret"), 0o600);
    fs::write(root.join("priv/open"), b"open").unwrap();
    set_mode(&root.join("priv/open"), 0o644);
    fs::write(root.join("priv/shared"), b"shared").unwrap();
    set_mode(&root.join("priv/shared"), 0o666);
    // A group directory (group `daemon`, rwx for the group only).
    mkdir(&root.join("grp"));
    chgrp(&root.join("grp"), daemon_gid);
    set_mode(&root.join("grp"), 0o770);
    // A sticky world-writable directory with a file of root's.
    mkdir(&root.join("sticky"));
    set_mode(&root.join("sticky"), 0o1777);
    fs::write(root.join("sticky/roots"), b"r").unwrap();

    let ok = |groups: &[u32], script: &str| {
        let (success, err) = sh_as(nobody, nogroup, groups, root, script);
        assert!(success, "as nobody {groups:?}: `{script}` failed: {err}");
    };
    let denied = |groups: &[u32], script: &str, why: &str| {
        let (success, err) = sh_as(nobody, nogroup, groups, root, script);
        assert!(!success, "as nobody {groups:?}: `{script}` succeeded");
        assert!(err.contains(why), "`{script}`: expected {why:?}, got {err}");
    };
    ok(&[], "cat priv/open >/dev/null");
    denied(&[], "cat priv/secret", "Permission denied");
    denied(&[], "echo x > priv/new", "Permission denied");
    denied(&[], "rm -f priv/open", "Permission denied");
    denied(&[], "touch priv/open", "Permission denied");
    // Others may touch what they may write, but set times only on their own.
    ok(&[], "touch priv/shared");
    denied(&[], "touch -d @1 priv/shared", "Operation not permitted");
    denied(&[], "chmod 777 priv/open", "Operation not permitted");
    // Supplementary groups count (read from /proc by the daemon).
    denied(&[], "echo x > grp/mine", "Permission denied");
    ok(
        &[daemon_gid],
        "echo x > grp/mine && cat grp/mine >/dev/null",
    );
    // Sticky directory: others' files stay, one's own may go.
    denied(&[], "rm -f sticky/roots", "Operation not permitted");
    ok(&[], "echo n > sticky/nobodys && rm sticky/nobodys");
    assert_eq!(fs::read(root.join("priv/secret")).unwrap(), b"secret");
    assert_eq!(fs::read(root.join("sticky/roots")).unwrap(), b"r");
}

#[test]
fn closing_a_host_local_file_sends_no_flush_and_its_mtime_follows_writes() {
    let (_td, m) = mounted("localflush");
    let d = m.mountpoint.join("tmp");
    mkdir(&d);
    let p = d.join("scratch");
    fs::write(&p, b"one").unwrap();
    let t1 = fs::metadata(&p).unwrap().modified().unwrap();
    let flushes = m.counter("flush");
    thread::sleep(std::time::Duration::from_millis(5));
    {
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"two").unwrap();
    }
    let t2 = fs::metadata(&p).unwrap().modified().unwrap();
    assert!(t2 > t1, "a write moves the mtime: {t1:?} then {t2:?}");
    assert_eq!(fs::read(&p).unwrap(), b"onetwo");
    assert_eq!(
        m.counter("flush"),
        flushes,
        "closing a host-local file needs no FLUSH"
    );
}
