//! Real-mount tests of `casfs mount --transport`: FUSE over io_uring serves
//! a mount (publications, reads, renames, a ccache build, invalidations) and
//! says so in `.casfs/stats`, the log and the metrics; `uring` on a kernel
//! that does not offer it is refused with the way to enable it; `auto`
//! falls back to /dev/fuse there and says why; `dev` stays on /dev/fuse.
//!
//! The kernel offers the ring while the fuse module's `enable_uring`
//! parameter is set: these tests set it (they run as root, like every
//! mount test) and, where they need it off, turn it off, each test under `PARAM_LOCK`
//! from start to end, then put the previous value back. A
//! connection that agreed to the ring keeps it whatever the parameter says
//! later, so other mounts are not disturbed. A kernel without FUSE over
//! io_uring (before 6.14, or without CONFIG_FUSE_IO_URING) fails these
//! tests, never skips them.

mod common;

use common::*;
use std::fs;
use std::sync::Mutex;

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Serializes the tests of this file that change `PARAM`.
static PARAM_LOCK: Mutex<()> = Mutex::new(());

/// Sets `PARAM` for as long as it lives, then puts the old value back.
struct RingParam {
    before: String,
}

impl RingParam {
    fn set(on: bool) -> RingParam {
        let before = fs::read_to_string(PARAM).unwrap_or_else(|e| {
            panic!(
                "{PARAM}: {e}; FUSE over io_uring needs Linux 6.14+ built with CONFIG_FUSE_IO_URING"
            )
        });
        fs::write(PARAM, if on { "1" } else { "0" })
            .unwrap_or_else(|e| panic!("cannot write {PARAM} (needs root): {e}"));
        RingParam {
            before: before.trim().to_string(),
        }
    }
}

impl Drop for RingParam {
    fn drop(&mut self) {
        let v = if self.before == "Y" { "1" } else { "0" };
        let _ = fs::write(PARAM, v);
    }
}

fn transport_line(m: &Mount) -> String {
    m.stats_text()
        .lines()
        .find(|l| l.starts_with("fuse_transport"))
        .unwrap_or_else(|| panic!("no fuse_transport line in stats:\n{}", m.stats_text()))
        .to_string()
}

fn ring_threads(m: &Mount) -> usize {
    fs::read_dir(format!("/proc/{}/task", m.pid()))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|c| c.starts_with("fuse-ring-"))
        .count()
}

#[test]
fn uring_transport_serves_the_mount_and_says_so() {
    let _g = PARAM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _param = RingParam::set(true);
    let td = TestDir::new("uring");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&td.store(), &mp, &["--transport", "uring"]);
    assert_eq!(transport_line(&m).split_whitespace().last(), Some("uring"));
    assert!(
        m.stats_json().contains("\"fuse_transport\":\"uring\""),
        "{}",
        m.stats_json()
    );
    assert!(
        m.metrics().contains("casfs_fuse_transport_info{mount=\"")
            && m.metrics().contains("transport=\"uring\"} 1"),
        "{}",
        m.metrics()
    );
    assert!(m.log().contains("FUSE transport: io_uring"), "{}", m.log());
    assert!(ring_threads(&m) >= 2, "no fuse-ring threads in the daemon");

    // Names, contents and renames go through the ring like through /dev/fuse.
    let dir = mp.join("cc/a/b");
    fs::create_dir_all(&dir).unwrap();
    let data = pattern(17, 300_000);
    publish(&dir, "x.tmp", "0123456789abcdef0123456789abcdR", &data);
    assert_eq!(
        fs::read(dir.join("0123456789abcdef0123456789abcdR")).unwrap(),
        data
    );
    fs::write(dir.join("stats"), b"1 2 3\n").unwrap();
    fs::rename(dir.join("stats"), dir.join("stats2")).unwrap();
    assert_eq!(read_text(&dir.join("stats2")), "1 2 3\n");
    let mut names = list_dir(&dir);
    names.sort();
    assert_eq!(names, ["0123456789abcdef0123456789abcdR", "stats2"]);
    fs::remove_file(dir.join("stats2")).unwrap();
    assert_eq!(
        errno_of(fs::metadata(dir.join("stats2")), "stat of a removed file"),
        libc::ENOENT
    );

    // A ccache build, cold then warm, gives gcc's objects.
    let all = jobs(&[1]);
    let reference = td.dir("gcc");
    gcc_reference(&all, &reference);
    let cc = Ccache::new(&mp.join("ccache"), &td.root);
    assert_all_compiled(
        &compile_all(Some(&cc), &all, &td.dir("cold"), 2),
        "cold build over the ring",
    );
    assert_all_compiled(
        &compile_all(Some(&cc), &all, &td.dir("warm"), 2),
        "warm build over the ring",
    );
    assert_objects_identical(
        &all,
        &td.dir("warm"),
        &reference,
        "warm build over the ring",
    );
    m.unmount();
    assert!(
        m.log().contains("unmounted"),
        "the daemon did not end cleanly after unmount:\n{}",
        m.log()
    );
}

#[test]
fn uring_transport_is_refused_clearly_when_the_kernel_does_not_offer_it() {
    let _g = PARAM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _param = RingParam::set(false);
    let td = TestDir::new("uring-off");
    let mp = td.mountpoint("mnt");
    let log = expect_mount_refused(
        &td.store(),
        &mp,
        &["--transport", "uring"],
        "--transport uring with enable_uring off",
    );
    assert!(
        log.contains("--transport uring") && log.contains("options fuse enable_uring=1"),
        "the refusal does not say how to enable the ring:\n{log}"
    );
    assert!(!is_mounted(&mp), "a refused mount left {mp:?} mounted");
}

#[test]
fn auto_transport_falls_back_to_dev_fuse_when_the_ring_is_off() {
    let td = TestDir::new("auto-off");
    let mp = td.mountpoint("mnt");
    let _g = PARAM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _param = RingParam::set(false);
    let m = Mount::start(&td.store(), &mp, &["--transport", "auto"]);
    assert_eq!(transport_line(&m).split_whitespace().last(), Some("dev"));
    assert!(
        m.log().contains("FUSE transport: /dev/fuse") && m.log().contains("enable_uring"),
        "the fallback does not say why:\n{}",
        m.log()
    );
    assert_eq!(ring_threads(&m), 0);
    fs::write(mp.join("f"), b"served").unwrap();
    assert_eq!(read_text(&mp.join("f")), "served");
}

#[test]
fn auto_transport_takes_the_ring_when_the_kernel_offers_it() {
    let td = TestDir::new("auto-on");
    let mp = td.mountpoint("mnt");
    let _g = PARAM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _param = RingParam::set(true);
    let m = Mount::start(&td.store(), &mp, &["--transport", "auto"]);
    assert_eq!(transport_line(&m).split_whitespace().last(), Some("uring"));
    fs::write(mp.join("f"), b"served").unwrap();
    assert_eq!(read_text(&mp.join("f")), "served");
}

#[test]
fn dev_transport_stays_on_dev_fuse_when_the_ring_is_on() {
    let td = TestDir::new("dev-on");
    let mp = td.mountpoint("mnt");
    let _g = PARAM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _param = RingParam::set(true);
    let m = Mount::start(&td.store(), &mp, &["--transport", "dev"]);
    assert_eq!(transport_line(&m).split_whitespace().last(), Some("dev"));
    assert_eq!(ring_threads(&m), 0);
    fs::write(mp.join("f"), b"served").unwrap();
    assert_eq!(read_text(&mp.join("f")), "served");
}
