//! Real-mount tests of a full disk, with the store on a small tmpfs:
//! - casfs fills it itself: the writer gets ENOSPC, the daemon stays up and
//!   keeps serving what it holds, and once space is freed it publishes
//!   again;
//! - another process fills it: new files, directories and writes get
//!   ENOSPC before the metadata database hits the full disk, and all work
//!   again, without a remount, once the other process frees its space;
//! - the full disk stops the metadata database (RocksDB keeps a failed
//!   write's error for good): once space is freed it is reopened, without
//!   a remount, and everything acknowledged before is still there, also
//!   after a `kill -9` and a remount.

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `size_mib` MiB mounted at `dir`, unmounted on drop (also when
/// the test fails; declare it before the `Mount` that uses it, so the
/// daemon is stopped first).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: PathBuf, size_mib: u64) -> Tmpfs {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m"),
                "casfs-test-tmpfs",
            ])
            .arg(&dir)
            .output()
            .expect("run mount -t tmpfs");
        assert!(
            out.status.success(),
            "mount tmpfs for the store: {}",
            output_text(&out)
        );
        Tmpfs { dir }
    }

    fn free_bytes(&self) -> u64 {
        let c = cpath(&self.dir);
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-pointer.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_bavail * s.f_frsize
    }

    /// Fills the filesystem to the last block with `dd`, a process other
    /// than casfs, and returns the file it wrote.
    fn fill_from_outside(&self) -> PathBuf {
        let filler = self.dir.join("filler");
        let out = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", filler.display()))
            .arg("bs=64k")
            .output()
            .expect("run dd");
        let text = output_text(&out);
        assert!(
            !out.status.success() && text.contains("No space left on device"),
            "dd was to fill the tmpfs until ENOSPC: {text}"
        );
        assert!(
            self.free_bytes() < 1 << 20,
            "the tmpfs still has {} bytes free after dd filled it",
            self.free_bytes()
        );
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(&self.dir).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            force_unmount(&self.dir);
        }
    }
}

/// Creates, writes, renames onto a result name and reads back: one
/// ccache-style publication that must succeed now.
fn publish_and_check(d: &Path, tmp: &str, name: &str, data: &[u8]) {
    publish(d, tmp, name, data);
    assert_eq!(fs::read(d.join(name)).unwrap(), data, "{name} reads back");
}

#[test]
fn full_store_gives_enospc_to_writer_keeps_serving_reads_and_recovers() {
    require_tools();
    let td = TestDir::new("fulldisk");
    let tmpfs = Tmpfs::mount(td.dir("fs"), 32);
    let store = tmpfs.dir.join("store");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&store, &mp, &[]);

    let d = mp.join("a");
    fs::create_dir_all(mp.join("tmp")).unwrap();
    fs::create_dir_all(&d).unwrap();
    let kept = pattern(1, 4096);
    publish(&d, "x.tmp", "0000000000000000000000000000aR", &kept);

    // Fill the disk through a scratch file until the writer is refused.
    let big = mp.join("tmp/big");
    let mut f = fs::File::create(&big).unwrap();
    let chunk = pattern(2, 1 << 20);
    let mut refused = None;
    for _ in 0..64 {
        if let Err(e) = f.write_all(&chunk) {
            refused = Some(e);
            break;
        }
    }
    drop(f);
    let e = refused.expect("a 32 MiB store accepted 64 MiB");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "the writer must see ENOSPC, got {e}"
    );

    // The daemon is still up and serves what it has.
    assert!(
        m.try_status().is_none(),
        "daemon died on a full disk:\n{}",
        m.log()
    );
    assert_eq!(
        fs::read(d.join("0000000000000000000000000000aR")).unwrap(),
        kept
    );
    assert!(
        m.counter("errors") >= 1,
        "a full disk is counted as an error"
    );

    // Space comes back: publishing works again. The kernel closes and
    // forgets the unlinked file asynchronously (RELEASE and FORGET carry no
    // reply), so wait until its blocks are free.
    fs::remove_file(&big).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tmpfs.free_bytes() < 16 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the unlinked 24 MiB file was not freed within 10 s:\n{}",
            m.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let fresh = pattern(3, 4096);
    publish(&d, "y.tmp", "0000000000000000000000000000bR", &fresh);
    assert_eq!(
        fs::read(d.join("0000000000000000000000000000bR")).unwrap(),
        fresh
    );
    m.unmount();
}

#[test]
fn disk_filled_by_another_process_refuses_new_files_before_the_database_fails_and_recovers_without_remount(
) {
    require_tools();
    let td = TestDir::new("fulldisk-other");
    let tmpfs = Tmpfs::mount(td.dir("fs"), 32);
    let store = tmpfs.dir.join("store");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&store, &mp, &[]);

    let d = mp.join("a");
    fs::create_dir_all(mp.join("tmp")).unwrap();
    fs::create_dir_all(&d).unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..4u64 {
        let name = format!("{i:029}R");
        let data = pattern(10 + i, 5000);
        publish_and_check(&d, "p.tmp", &name, &data);
        acknowledged.push((name, data));
    }
    // A scratch file being written when the disk fills.
    let mut scratch = fs::File::create(mp.join("tmp/scratch")).unwrap();
    scratch.write_all(b"before the disk filled\n").unwrap();

    let filler = tmpfs.fill_from_outside();

    // casfs's own budget still says there is room; the free-space check
    // sees the truth and refuses before anything reaches the database.
    let e = errno_of(fs::File::create(d.join("new.tmp")), "create on a full disk");
    assert_eq!(e, libc::ENOSPC, "create on a full disk: {}", errno_name(e));
    let e = errno_of(fs::create_dir(d.join("newdir")), "mkdir on a full disk");
    assert_eq!(e, libc::ENOSPC, "mkdir on a full disk: {}", errno_name(e));
    let e = errno_of(
        scratch.write_all(&pattern(4, 64 << 10)),
        "write on a full disk",
    );
    assert_eq!(e, libc::ENOSPC, "write on a full disk: {}", errno_name(e));
    // Reads go on.
    for (name, data) in &acknowledged {
        assert_eq!(
            &fs::read(d.join(name)).unwrap(),
            data,
            "{name} on a full disk"
        );
    }
    assert!(
        m.try_status().is_none(),
        "daemon died on a full disk:\n{}",
        m.log()
    );

    // The other process frees its space: everything works again at once.
    fs::remove_file(&filler).unwrap();
    scratch.write_all(b"after the disk was freed\n").unwrap();
    drop(scratch);
    fs::create_dir(d.join("newdir")).expect("mkdir once space is freed");
    publish_and_check(
        &d,
        "new.tmp",
        "0000000000000000000000000000fR",
        &pattern(5, 5000),
    );
    for (name, data) in &acknowledged {
        assert_eq!(
            &fs::read(d.join(name)).unwrap(),
            data,
            "{name} after the episode"
        );
    }
    let log = m.log();
    assert_eq!(
        log.matches("filled by another process").count(),
        1,
        "the episode is logged once, saying who filled the disk:\n{log}"
    );
    assert!(
        !log.contains("database refuses every write"),
        "the free-space check was to refuse before the metadata database hit the full disk:\n{log}"
    );
    m.unmount();
}

#[test]
fn database_stopped_by_a_disk_filled_elsewhere_is_reopened_once_space_is_freed_and_keeps_what_was_acknowledged(
) {
    require_tools();
    let td = TestDir::new("fulldisk-db");
    let tmpfs = Tmpfs::mount(td.dir("fs"), 32);
    let store = tmpfs.dir.join("store");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&store, &mp, &[]);

    let d = mp.join("a");
    fs::create_dir_all(mp.join("tmp")).unwrap();
    fs::create_dir_all(&d).unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..6u64 {
        let name = format!("{i:029}R");
        let data = pattern(20 + i, 7000);
        publish_and_check(&d, "p.tmp", &name, &data);
        acknowledged.push((name, data));
    }
    // (A shared file: host-local files' metadata is not in the database.)
    let touched = mp.join("touched");
    fs::write(&touched, b"shared").unwrap();

    let filler = tmpfs.fill_from_outside();

    // Touches are metadata-only changes (no free-space check): they go to
    // the database until its log needs a block the disk does not have.
    let mut failure = None;
    for n in 0..10_000 {
        if let Err(e) = chmod_flip(&touched) {
            failure = Some((n, e));
            break;
        }
    }
    let (n, e) = failure.expect("10000 touches on a full disk all succeeded");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "touch {n} on a full disk must fail with ENOSPC, got {e}"
    );
    // While the disk is full: changes get ENOSPC, reads go on.
    let e = errno_of(chmod_flip(&touched), "touch while stopped");
    assert_eq!(e, libc::ENOSPC, "touch while stopped: {}", errno_name(e));
    let e = errno_of(fs::create_dir(d.join("newdir")), "mkdir while stopped");
    assert_eq!(e, libc::ENOSPC, "mkdir while stopped: {}", errno_name(e));
    for (name, data) in &acknowledged {
        assert_eq!(
            &fs::read(d.join(name)).unwrap(),
            data,
            "{name} while stopped"
        );
    }

    // Space is freed: the next change reopens the database, at once.
    fs::remove_file(&filler).unwrap();
    chmod_flip(&touched).expect("touch once space is freed");
    fs::create_dir(d.join("newdir")).expect("mkdir once space is freed");
    let mut w = fs::File::create(mp.join("tmp/after")).expect("create once space is freed");
    w.write_all(b"written after the episode")
        .expect("write once space is freed");
    drop(w);
    let after = (
        "0000000000000000000000000000fR".to_string(),
        pattern(6, 7000),
    );
    publish_and_check(&d, "new.tmp", &after.0, &after.1);
    acknowledged.push(after);
    for (name, data) in &acknowledged {
        assert_eq!(
            &fs::read(d.join(name)).unwrap(),
            data,
            "{name} after reopening"
        );
    }
    let log = m.log();
    for (what, line) in [
        (
            "the stop (the touches were to stop the database)",
            "database refuses every write",
        ),
        ("the reopen", "database reopened"),
    ] {
        assert_eq!(
            log.matches(line).count(),
            1,
            "{what} is logged once per episode:\n{log}"
        );
    }
    assert!(
        log.matches("clock lease not written").count() <= 1,
        "a clock lease that cannot be written is logged once per episode:\n{log}"
    );

    // Nothing acknowledged is lost, also without a clean shutdown.
    m.kill9();
    let out = casfs(&["unmount".as_ref(), mp.as_os_str()]);
    assert!(
        out.status.success(),
        "casfs unmount of the dead mount: {}",
        output_text(&out)
    );
    let mut m = Mount::start(&store, &mp, &[]);
    for (name, data) in &acknowledged {
        assert_eq!(
            &fs::read(d.join(name)).unwrap(),
            data,
            "{name} after kill -9"
        );
    }
    assert!(d.join("newdir").is_dir(), "newdir after kill -9");
    assert_eq!(
        fs::read(mp.join("tmp/after")).unwrap(),
        b"written after the episode"
    );
    m.unmount();
}

/// A metadata-only change that writes the database: the mode flips between
/// 0o644 and 0o640.
fn chmod_flip(p: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(p)?.permissions().mode() & 0o777;
    let next = if mode == 0o644 { 0o640 } else { 0o644 };
    fs::set_permissions(p, fs::Permissions::from_mode(next))
}
