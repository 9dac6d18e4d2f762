//! Real-mount tests of unmodified tools doing ordinary things a cache
//! directory sees: the shell writing through duplicated descriptors,
//! concurrent creators and unlinkers in one directory, explicit timestamps,
//! hard links. Each reproduces a report in which casfs behaved differently
//! from a local disk.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bash(cwd: &Path, script: &str) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash {script:?}: {}",
        output_text(&out)
    );
}

/// A result name in ccache's ≤ 4.12 layout (create-only, bound at close).
fn result_name(i: u32) -> String {
    format!("{i:04}56789abcdefghijklmnopqrR")
}

#[test]
fn writes_through_a_duplicated_descriptor_are_all_published() {
    require_tools();
    let td = TestDir::new("tools-dup");
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&td.store(), &mp, &[]);
    let d = mp.join("a/b");
    fs::create_dir_all(&d).unwrap();
    // bash opens the file, dup2()s it onto stdout and closes the original
    // (FLUSH with nothing written yet), then writes through stdout.
    let r1 = result_name(1);
    bash(&d, &format!("printf 'A%.0s' {{1..4017}} > {r1}"));
    let got = fs::read(d.join(&r1)).unwrap();
    assert!(
        got == [b'A'; 4017],
        "redirect: {} bytes, not 4017 'A'",
        got.len()
    );
    // An explicit dup: writes before and after the first descriptor closes.
    let r2 = result_name(2);
    bash(
        &d,
        &format!("exec 3>{r2}; printf one >&3; exec 4>&3; exec 3>&-; printf two >&4; exec 4>&-"),
    );
    assert_eq!(fs::read_to_string(d.join(&r2)).unwrap(), "onetwo", "dup");
    // A forked child writes and exits (its close is a FLUSH) while the
    // parent still holds the file and writes after it.
    let r3 = result_name(3);
    bash(
        &d,
        &format!("{{ printf parent1; (printf child); printf parent2; }} > {r3}"),
    );
    assert_eq!(
        fs::read_to_string(d.join(&r3)).unwrap(),
        "parent1childparent2",
        "forked child"
    );
    // Still create-only once the last descriptor is gone.
    bash(&d, &format!("printf other > {r1}.tmp && mv {r1}.tmp {r1}"));
    assert!(fs::read(d.join(&r1)).unwrap() == [b'A'; 4017], "kept");
    drop(m);
}

#[test]
fn a_result_written_through_a_duplicate_reaches_another_host_whole() {
    require_tools();
    let td = TestDir::new("tools-dup-shared");
    let url = format!("file://{}", td.dir("nfs").display());
    let (mp_a, mp_b) = (td.mountpoint("a"), td.mountpoint("b"));
    let a = Mount::start(&td.dir("store-a"), &mp_a, &["--shared", &url]);
    let b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    fs::create_dir_all(mp_a.join("cc/x")).unwrap();
    let r = result_name(5);
    // The first close binds the empty file; the writes come after it.
    bash(
        &mp_a.join("cc/x"),
        &format!("exec 3>{r}; exec 4>&3; exec 3>&-; printf 'whole result' >&4; exec 4>&-"),
    );
    let out = casfs(&["sync".as_ref(), mp_a.as_os_str()]);
    assert!(out.status.success(), "sync: {}", output_text(&out));
    assert_eq!(
        fs::read_to_string(mp_b.join("cc/x").join(&r)).unwrap(),
        "whole result",
        "host B got another version"
    );
    drop((a, b));
}

/// Kills the children on drop, so a hung mount cannot outlive the test.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Aborts the FUSE connection of `mp` (what an operator does when a mount
/// hangs), so that a test can fail and clean up instead of hanging too.
fn abort_connection(mp: &Path) {
    if !Path::new("/sys/fs/fuse/connections/")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
    {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status();
    }
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && Path::new(f[4]) == mp {
            let minor = f[2].split(':').nth(1).unwrap_or("");
            let _ = fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
        }
    }
}

#[test]
fn creators_under_result_names_beside_unlinkers_do_not_hang_the_mount() {
    require_tools();
    let td = TestDir::new("tools-hang");
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&td.store(), &mp, &["--threads", "2"]);
    let d = mp.join("a/b");
    fs::create_dir_all(&d).unwrap();
    let run_for_s = 8;
    let mut kids = Children(Vec::new());
    // The clients are spawned outside the mount and `cd` into it, so a hung
    // mount cannot hang the test before its watchdog runs. Four create files
    // directly under result names (published at close); four create and
    // unlink ordinary files in the same directory.
    for w in 0..8 {
        let body = if w < 4 {
            format!("printf x > {w}$((i++))-56789abcdefghijklmnR")
        } else {
            format!(": > tmp.{w}; rm -f tmp.{w}")
        };
        let script = format!(
            "cd {} || exit 1; end=$((SECONDS+{run_for_s})); i=0; \
             while [ $SECONDS -lt $end ]; do {body}; done",
            d.display()
        );
        kids.0.push(
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    // Watchdog: generous, since the machine may be loaded; a hang is forever.
    let deadline = Instant::now() + Duration::from_secs(run_for_s + 90);
    let mut hung = false;
    for c in &mut kids.0 {
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    assert!(st.success(), "a client failed: {st:?}");
                    break;
                }
                _ if Instant::now() > deadline => {
                    hung = true;
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    if hung {
        // Clients blocked in the kernel cannot be killed until the
        // connection is gone.
        abort_connection(&mp);
        drop(kids);
        panic!(
            "the mount hung: clients still blocked {run_for_s}+90 s after they should have ended"
        );
    }
    // The mount still answers.
    let names = list_dir(&d);
    assert!(
        names.iter().any(|n| n.ends_with('R')),
        "results were published"
    );
    drop(m);
}

fn ino_nlink(p: &Path) -> (u64, u64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {p:?}: {e}"));
    (m.ino(), m.nlink())
}

#[test]
fn link_makes_another_name_of_the_same_file_in_every_class() {
    require_tools();
    let td = TestDir::new("tools-link");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&td.store(), &mp, &[]);
    let d = mp.join("a/b");
    fs::create_dir_all(&d).unwrap();

    // Host-local files: writes through one name show through the other.
    fs::write(d.join("plain.txt"), b"one").unwrap();
    fs::hard_link(d.join("plain.txt"), d.join("other.txt")).unwrap();
    let (i1, n1) = ino_nlink(&d.join("plain.txt"));
    assert_eq!(
        ino_nlink(&d.join("other.txt")),
        (i1, 2),
        "same inode, two names"
    );
    assert_eq!(n1, 2);
    fs::write(d.join("other.txt"), b"two").unwrap();
    assert_eq!(fs::read(d.join("plain.txt")).unwrap(), b"two");

    // A published result linked out to a generic name (ccache's hard_link
    // mode): one inode; the other name stays create-only.
    let r = result_name(7);
    publish(&d, "r.tmp", &r, b"result bytes");
    fs::hard_link(d.join(&r), d.join("out.o")).unwrap();
    let (ri, rn) = ino_nlink(&d.join(&r));
    assert_eq!((ino_nlink(&d.join("out.o")).0, rn), (ri, 2));
    let out = Command::new("test")
        .arg(d.join(&r))
        .arg("-ef")
        .arg(d.join("out.o"))
        .status()
        .unwrap();
    assert!(out.success(), "test R -ef out.o");
    fs::write(d.join("out.o"), b"scribbled").unwrap();
    assert_eq!(
        fs::read(d.join(&r)).unwrap(),
        b"result bytes",
        "create-only"
    );

    // The link()-based safe rename: link the temporary file to the result
    // name, then unlink it. A second one onto the same name succeeds and
    // keeps the first.
    let r2 = result_name(8);
    fs::write(d.join("t1.tmp"), b"first").unwrap();
    fs::hard_link(d.join("t1.tmp"), d.join(&r2)).unwrap();
    assert_eq!(ino_nlink(&d.join(&r2)).1, 2);
    fs::remove_file(d.join("t1.tmp")).unwrap();
    assert_eq!(ino_nlink(&d.join(&r2)).1, 1);
    fs::write(d.join("t2.tmp"), b"second").unwrap();
    // The kernel answers EEXIST itself when it knows the name (what the
    // link()-based rename expects: someone else published it first).
    if let Err(e) = fs::hard_link(d.join("t2.tmp"), d.join(&r2)) {
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EEXIST),
            "link onto a result: {e}"
        );
    }
    fs::remove_file(d.join("t2.tmp")).unwrap();
    assert_eq!(fs::read(d.join(&r2)).unwrap(), b"first");

    // Unlinking one name keeps the other; the links survive a remount.
    fs::remove_file(d.join(&r)).unwrap();
    assert_eq!(fs::read(d.join("out.o")).unwrap(), b"result bytes");
    assert_eq!(ino_nlink(&d.join("out.o")).1, 1);
    m.unmount();
    drop(m);
    let m = Mount::start(&td.store(), &mp, &[]);
    assert_eq!(ino_nlink(&d.join("plain.txt")), (i1, 2));
    assert_eq!(fs::read(d.join("other.txt")).unwrap(), b"two");
    fs::remove_file(d.join("plain.txt")).unwrap();
    assert_eq!(fs::read(d.join("other.txt")).unwrap(), b"two");
    assert_eq!(ino_nlink(&d.join("other.txt")).1, 1);
    drop(m);
    let out = casfs(&["fsck".as_ref(), "--store".as_ref(), td.store().as_os_str()]);
    assert!(
        out.status.success(),
        "fsck after links: {}",
        output_text(&out)
    );
}

#[test]
fn directory_link_counts_and_open_unlinked_files() {
    require_tools();
    let td = TestDir::new("tools-nlink");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&td.store(), &mp, &[]);
    let d = mp.join("d");
    let e = mp.join("e");
    fs::create_dir_all(d.join("x")).unwrap();
    fs::create_dir_all(d.join("y")).unwrap();
    fs::create_dir_all(&e).unwrap();
    fs::write(d.join("file"), b"f").unwrap();
    assert_eq!(ino_nlink(&d).1, 4, "2 + two subdirectories");
    fs::remove_dir(d.join("x")).unwrap();
    assert_eq!(ino_nlink(&d).1, 3);
    fs::rename(d.join("y"), e.join("y")).unwrap();
    assert_eq!(
        (ino_nlink(&d).1, ino_nlink(&e).1),
        (2, 3),
        "after moving a dir"
    );
    fs::create_dir(d.join("z")).unwrap();
    fs::rename(d.join("z"), e.join("y")).unwrap(); // onto an empty directory
    assert_eq!(
        (ino_nlink(&d).1, ino_nlink(&e).1),
        (2, 3),
        "after replacing one"
    );
    m.unmount();
    drop(m);
    let m = Mount::start(&td.store(), &mp, &[]);
    assert_eq!(
        (ino_nlink(&d).1, ino_nlink(&e).1),
        (2, 3),
        "after a remount"
    );

    // An open file that is unlinked shows st_nlink 0, as on Linux.
    let p = d.join("open.txt");
    fs::write(&p, b"still here").unwrap();
    let f = fs::File::open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop(f);
    drop(m);
}

// ---------------------------------------------------------------------------
// Races reported with unmodified tools (each ran for a while in the report;
// here a few seconds each, which reproduced them before the fixes).
// ---------------------------------------------------------------------------

/// Runs `f(worker)` on `n` threads until `secs` have passed; returns the
/// failures they report.
fn hammer(n: usize, secs: u64, f: impl Fn(usize, u64) -> Option<String> + Sync) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(secs);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for w in 0..n {
            let (f, failures) = (&f, &failures);
            s.spawn(move || {
                let mut i = 0;
                while Instant::now() < end {
                    if let Some(e) = f(w, i) {
                        let mut v = failures.lock().unwrap();
                        if v.len() < 20 {
                            v.push(e);
                        }
                    }
                    i += 1;
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

#[test]
fn the_scrub_never_drops_a_name_published_while_its_twin_is_unlinked() {
    require_tools();
    let td = TestDir::new("tools-scrub");
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&td.store(), &mp, &["--scrub-interval-ms", "1"]);
    let d = mp.join("a/b");
    fs::create_dir_all(&d).unwrap();
    // Identical bytes published and unlinked over and over: the blob's last
    // name goes and comes back while the scrub looks at it.
    let body = pattern(5, 3000);
    let failures = hammer(4, 10, |w, i| {
        let name = d.join(result_name(100 + w as u32));
        let tmp = d.join(format!("w{w}.tmp"));
        if let Err(e) = fs::write(&tmp, &body) {
            return Some(format!("write {i}: {e}"));
        }
        if let Err(e) = fs::rename(&tmp, &name) {
            return Some(format!("rename {i}: {e}"));
        }
        let r = match fs::read(&name) {
            Ok(got) if got == body => None,
            Ok(got) => Some(format!("read {i}: {} wrong bytes", got.len())),
            Err(e) => Some(format!("read right after rename {i}: {e}")),
        };
        let _ = fs::remove_file(&name);
        r
    });
    assert!(
        failures.is_empty(),
        "names vanished or failed: {failures:#?}"
    );
    assert_eq!(m.counter("corrupt_blobs"), 0, "nothing was corrupt");
    drop(m);
}

#[test]
fn concurrent_read_only_opens_of_a_result_never_fail() {
    require_tools();
    let td = TestDir::new("tools-opens");
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&td.store(), &mp, &[]);
    let d = mp.join("a/b");
    fs::create_dir_all(&d).unwrap();
    let body = pattern(6, 5000);
    let name = d.join(result_name(9));
    publish(&d, "r.tmp", &result_name(9), &body);
    let failures = hammer(2, 6, |_, i| match fs::File::open(&name) {
        Ok(f) => {
            let mut got = vec![0; 16];
            use std::os::unix::fs::FileExt;
            match f.read_at(&mut got, 0) {
                Ok(16) if got == body[..16] => None,
                r => Some(format!("read {i}: {r:?}")),
            }
        }
        Err(e) => Some(format!("open {i}: {e}")),
    });
    assert!(failures.is_empty(), "opens failed: {failures:#?}");
    drop(m);
}

#[test]
fn new_bytes_equal_to_a_quarantined_blob_are_stored_again() {
    require_tools();
    let td = TestDir::new("tools-quarantine");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&store, &mp, &["--scrub-interval-ms", "5"]);
    let d = mp.join("a/b");
    fs::create_dir_all(&d).unwrap();
    let body = pattern(7, 4000);
    publish(&d, "r1.tmp", &result_name(1), &body);
    // A reader holds the result while its blob is damaged on disk and the
    // scrub finds it.
    let reader = fs::File::open(d.join(result_name(1))).unwrap();
    let blob = fs::read_dir(store.join("blobs"))
        .unwrap()
        .flat_map(|s| fs::read_dir(s.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| fs::metadata(p).is_ok_and(|m| m.len() == body.len() as u64))
        .expect("the result's blob");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&blob).unwrap();
        f.write_at(b"X", 10).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.counter("corrupt_blobs") == 0 {
        assert!(
            Instant::now() < deadline,
            "the scrub never found the damaged blob"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The same bytes again, under a new name: stored again, and they stay.
    publish(&d, "r2.tmp", &result_name(2), &body);
    assert_eq!(fs::read(d.join(result_name(2))).unwrap(), body);
    std::thread::sleep(Duration::from_millis(300)); // many scrub rounds
    assert_eq!(
        fs::read(d.join(result_name(2))).unwrap(),
        body,
        "still there"
    );
    assert_eq!(
        m.counter("corrupt_blobs"),
        1,
        "only the damaged one was dropped"
    );
    drop(reader);
    drop(m);
}

#[test]
fn chown_r_of_the_mount_root_succeeds_and_owns_casfs_too() {
    require_tools();
    let td = TestDir::new("tools-chown");
    let mp = td.mountpoint("mnt");
    let _m = Mount::start(&td.store(), &mp, &[]);
    fs::create_dir_all(mp.join("a/b")).unwrap();
    fs::write(mp.join("a/b/f"), b"x").unwrap();
    // As an operator hands a cache to its build user. chown -R changes a
    // directory after its contents, so .casfs is asked before the root.
    bash(&mp, "chown -R nobody:nogroup .");
    let owner = |p: &Path| {
        let m = fs::metadata(p).unwrap_or_else(|e| panic!("stat {p:?}: {e}"));
        (m.uid(), m.gid())
    };
    let nobody = owner(&mp);
    assert_ne!(nobody, (0, 0), "the root was not chowned");
    for p in ["a/b/f", ".casfs", ".casfs/stats", ".casfs/metrics"] {
        assert_eq!(owner(&mp.join(p)), nobody, "{p} after chown -R");
    }
    // Nothing else of .casfs can be changed.
    let e = fs::set_permissions(
        mp.join(".casfs/stats"),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .expect_err("chmod of .casfs/stats");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
}
