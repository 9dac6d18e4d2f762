//! The operator's tooling in `mount-helpers/`, driven the way an operator
//! uses it: `mount -t casfs` and `/etc/fstab` lines through the mount(8)
//! helper `mount.casfs` (the daemon detached, ready before mount returns, its
//! errors reported with mount's exit status 32), `casfs-chroots` binding the
//! cache into chroots and undoing it (both idempotent), an unprivileged user
//! building with ccache through such a bind mount, and the installer staging
//! and removing every file under DESTDIR.
//!
//! The tests need root, /dev/fuse, ccache, gcc and util-linux's mount,
//! umount and setpriv; a missing tool is a failure, never a skip. They make
//! `/sbin/mount.casfs` available (a symlink to the repository's helper when
//! none is installed, removed again afterwards) and point it at the binary
//! under test with `CASFS_BIN`. Everything they mount is unmounted and every
//! daemon stopped when a guard drops, also when a test fails.

mod common;

use common::*;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// mount(8)'s exit status for a failed mount.
const MOUNT_FAILURE: i32 = 32;
/// How long `mount`, `umount` or a helper script may take before the test
/// fails (the helper's own readiness timeout is 30 s).
const COMMAND_TIMEOUT_S: u64 = 45;
const SBIN_HELPER: &str = "/sbin/mount.casfs";

fn require_helper_tools() {
    require_programs(&[
        ("mount", "mount"),
        ("umount", "mount"),
        ("setsid", "util-linux"),
        ("setpriv", "util-linux"),
        ("bash", "bash"),
        ("awk", "mawk"),
        ("timeout", "coreutils"),
    ]);
}

// ---------------------------------------------------------------------------
// /sbin/mount.casfs for the duration of the tests that need it
// ---------------------------------------------------------------------------

/// (tests holding the guard, whether we created the symlink)
static SBIN: Mutex<(usize, bool)> = Mutex::new((0, false));

/// Makes `/sbin/mount.casfs` available while held: when none is installed, a
/// symlink to the repository's helper, removed when the last holder drops
/// it. An installed helper is used as it is (and left alone).
struct SbinHelper;

impl SbinHelper {
    fn ensure() -> SbinHelper {
        require_helper_tools();
        let mut g = SBIN.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 == 0 {
            let p = Path::new(SBIN_HELPER);
            let ours = helpers_dir().join("mount.casfs");
            if fs::symlink_metadata(p).is_err() {
                std::os::unix::fs::symlink(&ours, p).unwrap_or_else(|e| {
                    panic!(
                        "cannot create {SBIN_HELPER} -> {ours:?} (are the tests run as root?): {e}"
                    )
                });
                g.1 = true;
            } else {
                g.1 = false;
                if fs::read(p).ok() != fs::read(&ours).ok() {
                    eprintln!(
                        "note: {SBIN_HELPER} is installed and differs from {ours:?}; the tests use \
                         the installed one (run mount-helpers/install to update it)"
                    );
                }
            }
        }
        g.0 += 1;
        SbinHelper
    }
}

impl Drop for SbinHelper {
    fn drop(&mut self) {
        let mut g = SBIN.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if g.0 == 0 && g.1 {
            let p = Path::new(SBIN_HELPER);
            if fs::read_link(p).ok() == Some(helpers_dir().join("mount.casfs")) {
                let _ = fs::remove_file(p);
            }
            g.1 = false;
        }
    }
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// Runs `cmd` (stdin /dev/null) and returns its output; fails if it runs
/// longer than `COMMAND_TIMEOUT_S`, or if its stdout/stderr stay open after it
/// exited (a daemon it started kept them: it is not detached).
fn run(mut cmd: Command, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let (tx, rx) = mpsc::channel();
    for (n, mut pipe) in [
        (
            1,
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        ),
        (2, Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((n, buf));
        });
    }
    let deadline = Instant::now() + Duration::from_secs(COMMAND_TIMEOUT_S);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: {cmd:?} still running after {COMMAND_TIMEOUT_S} s; killed it");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok((1, b)) => stdout = b,
            Ok((_, b)) => stderr = b,
            Err(_) => panic!(
                "{what}: {cmd:?} exited ({status}) but its stdout/stderr are still open 5 s later: \
                 a process it started (the daemon?) kept them, so it is not detached"
            ),
        }
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// `mount ARGS...` with the helper pointed at the binary under test and its
/// logs in `log_dir`.
fn mount(args: &[&std::ffi::OsStr], log_dir: &Path) -> Output {
    let mut c = Command::new("mount");
    c.args(args)
        .env("CASFS_BIN", CASFS_BIN)
        .env("CASFS_LOG_DIR", log_dir)
        .env("RUST_LOG", "info");
    run(c, &format!("mount {args:?}"))
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", output_text(out));
}

/// `umount MP`, then the daemon exits and nothing is mounted there.
fn umount_and_expect_daemon_exit(mp: &Path, daemon: &ForeignDaemon) {
    let mut c = Command::new("umount");
    c.arg(mp);
    let out = run(c, "umount");
    assert_ok(&out, &format!("umount {mp:?}"));
    daemon.wait_exit(EXIT_TIMEOUT_S);
    assert!(!is_mounted(mp), "{mp:?} still mounted after umount");
}

/// Asserts the top mount on `mp` is casfs serving `store`, and returns it.
fn assert_casfs_mounted(mp: &Path, store: &Path) -> MountInfo {
    let m = top_mount(mp).unwrap_or_else(|| panic!("nothing is mounted on {mp:?}"));
    assert!(
        m.fstype == "fuse.casfs" || (m.fstype == "fuse" && m.source.starts_with("casfs:")),
        "the mount on {mp:?} is not casfs: {m:?}"
    );
    assert_eq!(
        m.source,
        format!("casfs:{}", store.display()),
        "the mount on {mp:?} serves another store: {m:?}"
    );
    assert!(
        fs::read(mp.join(".casfs/stats")).is_ok(),
        "{mp:?} is mounted but .casfs/stats cannot be read"
    );
    m
}

/// The `-o` value the daemon was started with (None: no -o).
fn daemon_options(d: &ForeignDaemon) -> Option<String> {
    let argv = process_cmdline(d.pid);
    argv.iter()
        .position(|a| a == "-o")
        .map(|i| argv.get(i + 1).cloned().unwrap_or_default())
}

fn daemon_store(d: &ForeignDaemon) -> Option<String> {
    let argv = process_cmdline(d.pid);
    argv.iter()
        .position(|a| a == "--store")
        .and_then(|i| argv.get(i + 1).cloned())
}

/// The process's session id (field 6 of /proc/PID/stat).
fn session_id(pid: u32) -> u32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(3).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------
// mount -t casfs, /etc/fstab, errors
// ---------------------------------------------------------------------------

#[test]
fn mount_t_casfs_starts_a_detached_daemon_that_serves_ccache_and_umount_stops_it() {
    let _helper = SbinHelper::ensure();
    let td = TestDir::new("helper-mount");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let logs = td.dir("log");

    let t0 = Instant::now();
    let out = mount(
        &[
            "-t".as_ref(),
            "casfs".as_ref(),
            store.as_os_str(),
            mp.as_os_str(),
            "-o".as_ref(),
            "allow_other".as_ref(),
        ],
        &logs,
    );
    assert_ok(&out, "mount -t casfs STORE MP -o allow_other");
    // Ready when mount returns: no polling here.
    let m = assert_casfs_mounted(&mp, &store);
    let daemon = ForeignDaemon::find(&mp);
    eprintln!("mount -t casfs took {:?}", t0.elapsed());
    assert!(
        m.super_options.split(',').any(|o| o == "allow_other"),
        "allow_other did not reach the mount: {m:?}"
    );
    assert_eq!(
        daemon_options(&daemon).as_deref(),
        Some("allow_other"),
        "daemon command line: {:?}",
        process_cmdline(daemon.pid)
    );
    // Detached: its own session, stdin /dev/null, output to the log file.
    assert_eq!(
        session_id(daemon.pid),
        daemon.pid,
        "the daemon is not a session leader (not started with setsid)"
    );
    assert_eq!(
        fs::read_link(format!("/proc/{}/fd/0", daemon.pid)).ok(),
        Some(PathBuf::from("/dev/null")),
        "the daemon's stdin is not /dev/null"
    );
    let log = daemon
        .log_path
        .clone()
        .expect("the daemon's stdout is not a log file");
    assert!(
        log.starts_with(&logs) && log.extension().is_some_and(|e| e == "log"),
        "the daemon logs to {log:?}, not to a .log file in CASFS_LOG_DIR {logs:?}"
    );

    // A ccache build through the mount: misses, then all direct hits, and
    // gcc's own objects either way.
    let all = jobs(&[1]);
    let reference = td.dir("gcc");
    gcc_reference(&all, &reference);
    let ccache = Ccache::new(&mp.join("ccache"), &td.root);
    fs::create_dir_all(&ccache.dir).unwrap();
    ccache.zero_stats();
    let cold = td.dir("cold");
    assert_all_compiled(
        &compile_all(Some(&ccache), &all, &cold, 4),
        "cold build through mount -t casfs",
    );
    assert_objects_identical(&all, &cold, &reference, "cold build");
    let st = ccache.print_stats();
    assert_eq!(
        st.misses(),
        all.len() as u64,
        "cold build: {}",
        st.summary()
    );
    ccache.zero_stats();
    let warm = td.dir("warm");
    assert_all_compiled(
        &compile_all(Some(&ccache), &all, &warm, 4),
        "warm build through mount -t casfs",
    );
    assert_objects_identical(&all, &warm, &reference, "warm build");
    let st = ccache.print_stats();
    assert_eq!(
        (st.direct_hits(), st.misses()),
        (all.len() as u64, 0),
        "warm build must be all direct hits: {}",
        st.summary()
    );

    umount_and_expect_daemon_exit(&mp, &daemon);
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("mount.casfs:") && text.contains("mounted"),
        "the log {log:?} does not show the start and the mount:\n{text}"
    );
}

#[test]
fn fstab_lines_mount_by_mountpoint_and_mount_a_is_idempotent() {
    let _helper = SbinHelper::ensure();
    let td = TestDir::new("helper-fstab");
    let store1 = td.dir("store1");
    let store2 = td.dir("store2");
    let mp1 = td.mountpoint("mnt1");
    let mp2 = td.mountpoint("mnt2");
    let logs = td.dir("log");
    let fstab = td.path("fstab");
    // Line 1: a plain store path, `noauto` (so `mount -a` leaves it) and the
    // options only mount(8) and systemd care about, which the helper must
    // drop. Line 2: the `casfs:STORE` form, which is also what the kernel
    // shows as the source, so `mount -a` recognises it as mounted.
    fs::write(
        &fstab,
        format!(
            "# test fstab\n\
             {} {} casfs noauto,allow_other,nofail,_netdev,noatime,nodev,nosuid,x-systemd.requires=network.target,comment=farm 0 0\n\
             casfs:{} {} casfs defaults 0 0\n",
            store1.display(),
            mp1.display(),
            store2.display(),
            mp2.display()
        ),
    )
    .unwrap();

    let out = mount(&["-T".as_ref(), fstab.as_os_str(), mp1.as_os_str()], &logs);
    assert_ok(&out, "mount -T FSTAB MP1");
    assert_casfs_mounted(&mp1, &store1);
    let d1 = ForeignDaemon::find(&mp1);
    assert_eq!(
        daemon_options(&d1).as_deref(),
        Some("allow_other"),
        "mount(8)-only options must be dropped; daemon command line: {:?}",
        process_cmdline(d1.pid)
    );
    assert!(!is_mounted(&mp2), "mount -T FSTAB MP1 mounted MP2 too");

    let out = mount(&["-T".as_ref(), fstab.as_os_str(), "-a".as_ref()], &logs);
    assert_ok(&out, "mount -T FSTAB -a");
    assert_casfs_mounted(&mp2, &store2);
    let d2 = ForeignDaemon::find(&mp2);
    assert_eq!(
        daemon_options(&d2),
        None,
        "`defaults` must leave no options; daemon command line: {:?}",
        process_cmdline(d2.pid)
    );
    assert_eq!(
        daemon_store(&d2).as_deref(),
        Some(store2.to_str().unwrap()),
        "casfs:STORE must become --store STORE; daemon command line: {:?}",
        process_cmdline(d2.pid)
    );
    assert_eq!(mount_count(&mp1), 1, "mount -a touched the noauto line");

    // Again: everything is mounted already, nothing changes, success.
    let out = mount(&["-T".as_ref(), fstab.as_os_str(), "-a".as_ref()], &logs);
    assert_ok(&out, "a second mount -T FSTAB -a");
    assert_eq!(
        (mount_count(&mp1), mount_count(&mp2)),
        (1, 1),
        "a second mount -a stacked mounts"
    );
    assert_eq!(
        casfs_daemons_for(&mp2),
        vec![d2.pid],
        "a second mount -a started another daemon"
    );

    publish(&mp1, "a.tmp", "a", b"through fstab line 1");
    publish(&mp2, "b.tmp", "b", b"through fstab line 2");
    assert_eq!(fs::read(mp1.join("a")).unwrap(), b"through fstab line 1");
    assert_eq!(fs::read(mp2.join("b")).unwrap(), b"through fstab line 2");

    umount_and_expect_daemon_exit(&mp1, &d1);
    umount_and_expect_daemon_exit(&mp2, &d2);
}

/// `mount` must fail with status 32 and the daemon's own `casfs: ` message,
/// leave nothing mounted and no daemon running.
fn expect_helper_failure(out: &Output, mp: &Path, why: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(MOUNT_FAILURE),
        "{why}: mount must exit {MOUNT_FAILURE}:\n{}",
        output_text(out)
    );
    assert!(
        stderr.lines().any(|l| l.starts_with("casfs: ") && l.contains(needle)),
        "{why}: mount's stderr must carry the daemon's `casfs: ` message mentioning {needle:?}:\n{}",
        output_text(out)
    );
    assert!(
        casfs_daemons_for(mp).is_empty(),
        "{why}: a daemon is still running for {mp:?}"
    );
}

#[test]
fn mount_failures_exit_32_with_the_daemons_message() {
    let _helper = SbinHelper::ensure();
    let td = TestDir::new("helper-errors");
    let mp = td.mountpoint("mnt");
    let logs = td.dir("log");

    // A directory that holds something else is not a store.
    let not_a_store = td.dir("not-a-store");
    fs::write(not_a_store.join("precious.txt"), b"someone's data").unwrap();
    let out = mount(
        &[
            "-t".as_ref(),
            "casfs".as_ref(),
            not_a_store.as_os_str(),
            mp.as_os_str(),
        ],
        &logs,
    );
    expect_helper_failure(
        &out,
        &mp,
        "a store that is not a casfs store",
        &not_a_store.display().to_string(),
    );
    assert!(
        !is_mounted(&mp),
        "{mp:?} mounted although the store was refused"
    );
    assert_eq!(
        fs::read(not_a_store.join("precious.txt")).unwrap(),
        b"someone's data",
        "the refused store directory was changed"
    );

    // An option the daemon does not know.
    let store = td.store();
    let out = mount(
        &[
            "-t".as_ref(),
            "casfs".as_ref(),
            store.as_os_str(),
            mp.as_os_str(),
            "-o".as_ref(),
            "allow_other,frobnicate".as_ref(),
        ],
        &logs,
    );
    expect_helper_failure(&out, &mp, "an unknown option", "frobnicate");
    assert!(!is_mounted(&mp), "{mp:?} mounted with an unknown option");

    // A mountpoint that does not exist.
    let missing = td.path("no-such-dir");
    let out = mount(
        &[
            "-t".as_ref(),
            "casfs".as_ref(),
            store.as_os_str(),
            missing.as_os_str(),
        ],
        &logs,
    );
    // mount(8) itself may refuse a missing directory before calling the helper.
    assert!(
        !out.status.success(),
        "mount on a missing directory succeeded:\n{}",
        output_text(&out)
    );
    assert_eq!(
        out.status.code(),
        Some(MOUNT_FAILURE),
        "{}",
        output_text(&out)
    );

    // Mounting over a live casfs mount: the new daemon is refused, and the
    // mount already there must not pass for a successful one.
    let first = mount(
        &[
            "-t".as_ref(),
            "casfs".as_ref(),
            store.as_os_str(),
            mp.as_os_str(),
        ],
        &logs,
    );
    assert_ok(&first, "mount -t casfs STORE MP");
    let daemon = ForeignDaemon::find(&mp);
    let other = td.dir("store-2");
    let out = mount(
        &[
            "-t".as_ref(),
            "casfs".as_ref(),
            other.as_os_str(),
            mp.as_os_str(),
        ],
        &logs,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(MOUNT_FAILURE),
        "mount over a live casfs mount must fail:\n{}",
        output_text(&out)
    );
    assert!(
        stderr.lines().any(|l| l.starts_with("casfs: ")),
        "no daemon message:\n{}",
        output_text(&out)
    );
    assert_eq!(mount_count(&mp), 1, "a second mount was stacked on {mp:?}");
    assert_casfs_mounted(&mp, &store);
    assert_eq!(
        casfs_daemons_for(&mp),
        vec![daemon.pid],
        "the refused daemon is still running"
    );
    umount_and_expect_daemon_exit(&mp, &daemon);
}

#[test]
fn helper_stops_a_daemon_that_is_not_ready_in_time_and_fails() {
    require_helper_tools();
    let td = TestDir::new("helper-timeout");
    let mp = td.mountpoint("mnt");
    let logs = td.dir("log");
    // A "daemon" that never mounts anything.
    let fake = td.path("casfs");
    fs::write(
        &fake,
        "#!/bin/sh\necho 'fake casfs: starting and never ready'\nexec sleep 300\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = Command::new(helpers_dir().join("mount.casfs"));
    c.arg(td.store())
        .arg(&mp)
        .args(["-o", "rw"])
        .env("CASFS_BIN", &fake)
        .env("CASFS_LOG_DIR", &logs)
        .env("CASFS_READY_TIMEOUT", "2");
    let t0 = Instant::now();
    let out = run(c, "mount.casfs with a daemon that never gets ready");
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(MOUNT_FAILURE),
        "{}",
        output_text(&out)
    );
    assert!(
        stderr.contains("not ready after 2 s") && stderr.contains("fake casfs: starting"),
        "the failure must say it timed out and show the daemon's log:\n{}",
        output_text(&out)
    );
    assert!(
        took < Duration::from_secs(15),
        "the helper took {took:?} to give up after 2 s"
    );
    // The daemon it started is gone.
    let pid: u32 = stderr
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no daemon pid in:\n{stderr}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !process_alive(pid),
        "the helper left the unready daemon (pid {pid}) running"
    );
    assert!(!is_mounted(&mp));
}

// ---------------------------------------------------------------------------
// casfs-chroots
// ---------------------------------------------------------------------------

/// Lazily unmounts whatever is still mounted on the given targets when
/// dropped (declare it after the `Mount` so it drops first: while a bind of
/// the mount exists, the filesystem, and so its daemon, stays alive).
struct Binds(Vec<PathBuf>);

impl Drop for Binds {
    fn drop(&mut self) {
        for t in &self.0 {
            for _ in 0..4 {
                if !is_mounted(t) {
                    break;
                }
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(t)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn casfs_chroots(args: &[&std::ffi::OsStr]) -> Output {
    let mut c = Command::new(helpers_dir().join("casfs-chroots"));
    c.args(args);
    run(c, &format!("casfs-chroots {args:?}"))
}

#[test]
fn casfs_chroots_binds_the_mount_into_each_chroot_idempotently_and_undo_removes_them() {
    require_helper_tools();
    let td = TestDir::new("chroots");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let c1 = td.dir("chroot1");
    let c2 = td.dir("chroot2");
    fs::create_dir_all(c2.join("var/cache")).unwrap();
    let _m = Mount::start(&store, &mp, &["-o", "allow_other"]);
    let t1 = c1.join("var/cache/ccache");
    let t2 = c2.join("var/cache/ccache");
    let _binds = Binds(vec![t1.clone(), t2.clone()]);
    let mp_dev = fs::metadata(&mp).unwrap().dev();

    // Refused: a directory that is not a casfs mount; nothing is created.
    let plain = td.dir("plain");
    let out = casfs_chroots(&[plain.as_os_str(), c1.as_os_str()]);
    assert!(
        !out.status.success(),
        "casfs-chroots accepted a plain directory:\n{}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a mount point"),
        "unclear error for a plain directory:\n{}",
        output_text(&out)
    );
    assert!(!t1.exists(), "a refused run created {t1:?}");

    let out = casfs_chroots(&[mp.as_os_str(), c1.as_os_str(), c2.as_os_str()]);
    assert_ok(&out, "casfs-chroots MP C1 C2");
    for t in [&t1, &t2] {
        assert_eq!(
            mount_count(t),
            1,
            "{t:?} after casfs-chroots:\n{}",
            output_text(&out)
        );
        let m = top_mount(t).unwrap();
        assert_eq!(m.root, "/", "{t:?} binds a subdirectory: {m:?}");
        assert_eq!(
            fs::metadata(t).unwrap().dev(),
            mp_dev,
            "{t:?} is not the casfs mount"
        );
    }
    publish(&mp, "x.tmp", "from-host", b"host");
    publish(&t1, "y.tmp", "from-chroot1", b"chroot 1");
    assert_eq!(fs::read(t2.join("from-host")).unwrap(), b"host");
    assert_eq!(fs::read(t2.join("from-chroot1")).unwrap(), b"chroot 1");
    assert_eq!(fs::read(mp.join("from-chroot1")).unwrap(), b"chroot 1");

    // Again: a no-op that succeeds.
    let ids: Vec<u64> = [&t1, &t2]
        .iter()
        .map(|t| top_mount(t).unwrap().id)
        .collect();
    let out = casfs_chroots(&[mp.as_os_str(), c1.as_os_str(), c2.as_os_str()]);
    assert_ok(&out, "a second casfs-chroots MP C1 C2");
    let ids_after: Vec<u64> = [&t1, &t2]
        .iter()
        .map(|t| top_mount(t).unwrap().id)
        .collect();
    assert_eq!(
        ((mount_count(&t1), mount_count(&t2)), ids_after),
        ((1, 1), ids),
        "a second run changed the mounts:\n{}",
        output_text(&out)
    );

    let out = casfs_chroots(&[
        mp.as_os_str(),
        c1.as_os_str(),
        c2.as_os_str(),
        "--undo".as_ref(),
    ]);
    assert_ok(&out, "casfs-chroots --undo");
    for t in [&t1, &t2] {
        assert!(
            !is_mounted(t),
            "{t:?} still mounted after --undo:\n{}",
            output_text(&out)
        );
        assert!(
            !t.join("from-host").exists(),
            "{t:?} still shows the cache after --undo"
        );
    }
    let out = casfs_chroots(&[
        mp.as_os_str(),
        c1.as_os_str(),
        c2.as_os_str(),
        "--undo".as_ref(),
    ]);
    assert_ok(&out, "a second casfs-chroots --undo");
    assert!(!is_mounted(&t1) && !is_mounted(&t2));
    // The mount itself is untouched.
    assert_eq!(fs::read(mp.join("from-chroot1")).unwrap(), b"chroot 1");
}

// ---------------------------------------------------------------------------
// An unprivileged builder
// ---------------------------------------------------------------------------

/// `ccache ARGS` as `uid`:`gid` (no supplementary groups), asserting success.
fn ccache_as(ccache: &Ccache, uid: u32, gid: u32, args: &[&str]) -> String {
    let base = ccache.command();
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg("ccache")
        .args(args)
        .current_dir("/");
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = run(c, &format!("ccache {args:?} as {uid}:{gid}"));
    assert_ok(&out, &format!("ccache {args:?} as uid {uid}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stat_of(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.split_once('\t').filter(|(k, _)| *k == key))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key:?} in ccache --print-stats:\n{text}"))
}

/// Every regular file below `dir` with its owner.
fn files_with_owners(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
    for e in fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"))
        .flatten()
    {
        let p = e.path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            files_with_owners(&p, out);
        } else if m.is_file() {
            out.push((p, m.uid()));
        }
    }
}

#[test]
fn nobody_builds_with_ccache_through_a_chroot_bind_of_an_allow_other_mount() {
    let _helper = SbinHelper::ensure();
    let (uid, _) = user_ids("nobody");
    let gid = group_id("nogroup");
    let td = TestDir::new("nobody");
    let store = td.store();
    let mp = td.mountpoint("mnt");
    let logs = td.dir("log");
    let chroot = td.dir("chroot");
    let target = chroot.join("var/cache/ccache");

    let opts = format!("allow_other,uid={uid},gid={gid},mode=0775");
    let out = mount(
        &[
            "-t".as_ref(),
            "casfs".as_ref(),
            store.as_os_str(),
            mp.as_os_str(),
            "-o".as_ref(),
            opts.as_ref(),
        ],
        &logs,
    );
    assert_ok(&out, &format!("mount -t casfs STORE MP -o {opts}"));
    let daemon = ForeignDaemon::find(&mp);
    let root = fs::metadata(&mp).unwrap();
    assert_eq!(
        (root.uid(), root.gid(), root.mode() & 0o7777),
        (uid, gid, 0o775),
        "-o uid={uid},gid={gid},mode=0775 must set the cache root's owner, group and mode"
    );

    let out = casfs_chroots(&[mp.as_os_str(), chroot.as_os_str()]);
    let _binds = Binds(vec![target.clone()]);
    assert_ok(&out, "casfs-chroots MP CHROOT");

    // Sources and objects where nobody can read and write.
    let src = td.dir("src");
    for f in fs::read_dir(csrc_dir()).unwrap().flatten() {
        fs::copy(f.path(), src.join(f.file_name())).unwrap();
    }
    let all: Vec<Job> = jobs(&[1])
        .into_iter()
        .take(8)
        .map(|j| Job {
            src: src.join(j.src.file_name().unwrap()),
            ..j
        })
        .collect();
    let reference = td.dir("gcc");
    gcc_reference(&all, &reference);
    let obj_dir = |name: &str| {
        let d = td.dir(name);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        d
    };

    let ccache = Ccache::new(&target, &td.root);
    ccache_as(&ccache, uid, gid, &["-z"]);
    let cold = obj_dir("cold");
    assert_all_compiled(
        &compile_all_as_user(&ccache, &all, &cold, 4, uid, gid),
        "nobody's cold build through the chroot bind mount",
    );
    assert_objects_identical(&all, &cold, &reference, "nobody's cold build");
    let st = ccache_as(&ccache, uid, gid, &["--print-stats"]);
    assert_eq!(
        stat_of(&st, "cache_miss"),
        all.len() as u64,
        "cold build:\n{st}"
    );

    ccache_as(&ccache, uid, gid, &["-z"]);
    let warm = obj_dir("warm");
    assert_all_compiled(
        &compile_all_as_user(&ccache, &all, &warm, 4, uid, gid),
        "nobody's warm build through the chroot bind mount",
    );
    assert_objects_identical(&all, &warm, &reference, "nobody's warm build");
    let st = ccache_as(&ccache, uid, gid, &["--print-stats"]);
    assert_eq!(
        (stat_of(&st, "direct_cache_hit"), stat_of(&st, "cache_miss")),
        (all.len() as u64, 0),
        "nobody's warm build must be all direct hits:\n{st}"
    );

    // What nobody wrote belongs to nobody, seen from the host's mount too.
    let mut files = Vec::new();
    files_with_owners(&mp, &mut files);
    let not_nobodys: Vec<&(PathBuf, u32)> = files
        .iter()
        .filter(|(p, u)| *u != uid && !p.starts_with(mp.join(".casfs")))
        .collect();
    assert!(
        files.len() > all.len(),
        "too few files in the cache: {files:?}"
    );
    assert!(
        not_nobodys.is_empty(),
        "files in the cache not owned by nobody (uid {uid}): {not_nobodys:?}"
    );

    let out = casfs_chroots(&[mp.as_os_str(), chroot.as_os_str(), "--undo".as_ref()]);
    assert_ok(&out, "casfs-chroots --undo");
    umount_and_expect_daemon_exit(&mp, &daemon);
}

// ---------------------------------------------------------------------------
// The installer
// ---------------------------------------------------------------------------

/// Whether two files have the same bytes (read in chunks: the binary is big).
fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (fs::File::open(a), fs::File::open(b)) else {
        return false;
    };
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

#[test]
fn installer_stages_every_file_under_destdir_and_uninstall_removes_them() {
    require_helper_tools();
    let td = TestDir::new("install");
    let dest = td.dir("dest");
    // The binary under test is $CARGO_TARGET_DIR/release/casfs.
    let target_dir = Path::new(CASFS_BIN).parent().unwrap().parent().unwrap();
    let installer = |args: &[&str]| {
        let mut c = Command::new(helpers_dir().join("install"));
        c.args(args)
            .env("DESTDIR", &dest)
            .env("CARGO_TARGET_DIR", target_dir);
        run(c, &format!("DESTDIR=... install {args:?}"))
    };
    let system_bin_before = Path::new("/usr/local/bin/casfs").exists();

    let out = installer(&[]);
    assert_ok(&out, "DESTDIR=... mount-helpers/install");
    let repo = helpers_dir().parent().unwrap().to_path_buf();
    let expect: Vec<(&str, u32, Option<PathBuf>)> = vec![
        // Stripped: checked below, not compared.
        ("usr/local/bin/casfs", 0o755, None),
        (
            "sbin/mount.casfs",
            0o755,
            Some(helpers_dir().join("mount.casfs")),
        ),
        (
            "usr/local/sbin/casfs-chroots",
            0o755,
            Some(helpers_dir().join("casfs-chroots")),
        ),
        (
            "usr/local/sbin/casfs-textfile",
            0o755,
            Some(helpers_dir().join("casfs-textfile")),
        ),
        (
            "etc/systemd/system/casfs@.service",
            0o644,
            Some(helpers_dir().join("casfs@.service")),
        ),
        (
            "etc/systemd/system/casfs-textfile.service",
            0o644,
            Some(helpers_dir().join("casfs-textfile.service")),
        ),
        (
            "etc/systemd/system/casfs-textfile.timer",
            0o644,
            Some(helpers_dir().join("casfs-textfile.timer")),
        ),
        (
            "etc/default/casfs",
            0o644,
            Some(helpers_dir().join("casfs.default")),
        ),
        (
            "etc/logrotate.d/casfs",
            0o644,
            Some(helpers_dir().join("casfs.logrotate")),
        ),
        (
            "usr/local/share/doc/casfs/README.md",
            0o644,
            Some(repo.join("README.md")),
        ),
        (
            "usr/local/share/doc/casfs/mount-helpers.md",
            0o644,
            Some(helpers_dir().join("README.md")),
        ),
        (
            "usr/local/share/doc/casfs/ccache.conf.example",
            0o644,
            Some(helpers_dir().join("ccache.conf.example")),
        ),
        ("sbin/mount.fuse.casfs", 0o777, None),
    ];
    // And the documentation by topic.
    let expect: Vec<(String, u32, Option<PathBuf>)> = expect
        .into_iter()
        .map(|(rel, mode, orig)| (rel.to_string(), mode, orig))
        .chain(
            ["usage", "semantics", "operations", "design", "performance"].map(|topic| {
                (
                    format!("usr/local/share/doc/casfs/doc/{topic}.md"),
                    0o644,
                    Some(repo.join(format!("doc/{topic}.md"))),
                )
            }),
        )
        .collect();
    for (rel, mode, same_as) in &expect {
        let p = dest.join(rel);
        let m = fs::symlink_metadata(&p)
            .unwrap_or_else(|e| panic!("install did not create {p:?}: {e}\n{}", output_text(&out)));
        if let Some(orig) = same_as {
            assert_eq!(m.mode() & 0o7777, *mode, "mode of {p:?}");
            assert!(same_content(&p, orig), "{p:?} is not a copy of {orig:?}");
        } else if rel.ends_with("mount.fuse.casfs") {
            assert_eq!(
                fs::read_link(&p).ok(),
                Some(PathBuf::from("mount.casfs")),
                "{p:?} must be a symlink to mount.casfs"
            );
        }
    }
    // The binary is installed stripped: a fraction of the build's size,
    // and it runs.
    let bin = dest.join("usr/local/bin/casfs");
    let (built, installed) = (
        fs::metadata(CASFS_BIN).unwrap().len(),
        fs::metadata(&bin).unwrap().len(),
    );
    assert_eq!(fs::metadata(&bin).unwrap().mode() & 0o7777, 0o755);
    assert!(
        installed < built / 4,
        "the installed binary ({installed} bytes) is not stripped (built: {built} bytes)"
    );
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(
        version.status.success() && String::from_utf8_lossy(&version.stdout).starts_with("casfs "),
        "the stripped binary does not run: {}",
        output_text(&version)
    );
    eprintln!("installed binary: {installed} bytes (built: {built} bytes)");
    assert_eq!(
        Path::new("/usr/local/bin/casfs").exists(),
        system_bin_before,
        "install with DESTDIR touched /usr/local/bin/casfs"
    );

    // An operator's edits to /etc/default/casfs survive a reinstall and an
    // uninstall.
    let defaults = dest.join("etc/default/casfs");
    fs::write(&defaults, "CASFS_OPTIONS=allow_other,max_size=20G\n").unwrap();
    assert_ok(&installer(&[]), "a second install");
    assert_eq!(
        fs::read_to_string(&defaults).unwrap(),
        "CASFS_OPTIONS=allow_other,max_size=20G\n",
        "reinstalling overwrote /etc/default/casfs"
    );
    // An enabled instance is disabled on uninstall.
    let wants = dest.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/casfs@.service",
        wants.join("casfs@var-cache-ccache.service"),
    )
    .unwrap();

    let out = installer(&["--uninstall"]);
    assert_ok(&out, "install --uninstall");
    for (rel, _, _) in &expect {
        let p = dest.join(rel);
        if rel == "etc/default/casfs" {
            assert!(p.exists(), "uninstall removed the edited {p:?}");
        } else {
            assert!(
                fs::symlink_metadata(&p).is_err(),
                "uninstall left {p:?}:\n{}",
                output_text(&out)
            );
        }
    }
    assert!(
        fs::symlink_metadata(wants.join("casfs@var-cache-ccache.service")).is_err(),
        "uninstall left the enabled instance's symlink"
    );
    // Uninstalling again is fine.
    assert_ok(&installer(&["--uninstall"]), "a second install --uninstall");
}
