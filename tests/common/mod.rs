//! Shared helpers for the real-mount tests: a `TestDir` and a `Mount` guard
//! that always unmount and kill what they start (also when a test panics),
//! readers for the `.casfs/` statistics files, and helpers that drive Debian's
//! `ccache` and `gcc` over the C sources in `tests/csrc/`.
//!
//! Invariants kept here:
//! - Nothing is ever skipped: a missing `/dev/fuse`, `ccache` or `gcc` is a
//!   test failure with a message saying what to install.
//! - Every daemon a test starts is killed and its mountpoint unmounted when the
//!   guard drops; a temp dir is removed only when nothing below it is mounted.
//! - A daemon that stops answering cannot hang the suite: a watchdog kills it
//!   after `WATCHDOG_S`, which turns every blocked request into an error.
//! - Every `Mount` serves on the transport `CASFS_TEST_TRANSPORT` names
//!   (`dev`, the default, or `uring`: FUSE over io_uring, which then must be
//!   available, else the test fails saying how to enable it), unless the
//!   test passes its own `--transport`.
//! - ccache runs with no user configuration, no `CCACHE_*` variables from the
//!   caller, and a fixed working directory (`/`) and source directory, so its
//!   hashes are the same in every run and on every machine.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The daemon under test, built by cargo for the integration tests.
pub const CASFS_BIN: &str = env!("CARGO_BIN_EXE_casfs");
/// How long a daemon may take until `.casfs/stats` is readable: hang
/// detection only (a loaded 2-core machine has taken over 10 s).
pub const READY_TIMEOUT_S: u64 = 30;
/// How long a daemon may take to exit after unmount or a signal, and how long
/// a refused `casfs mount` may take to give up.
pub const EXIT_TIMEOUT_S: u64 = 10;
/// A daemon still running after this long is killed so a hung request fails
/// the test instead of hanging the suite.
pub const WATCHDOG_S: u64 = 150;
/// How much of a daemon's log is printed when a test fails.
const LOG_TAIL_BYTES_MAX: usize = 16 * 1024;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique_suffix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}-{}-{}", std::process::id(), n, nanos)
}

// ---------------------------------------------------------------------------
// Required tools
// ---------------------------------------------------------------------------

/// Fails (never skips) when something the mount tests need is missing.
pub fn require_tools() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        let mut missing = Vec::new();
        if !Path::new("/dev/fuse").exists() {
            missing.push(
                "/dev/fuse does not exist (load the fuse module / run the container with \
                 --device /dev/fuse --cap-add SYS_ADMIN)"
                    .to_string(),
            );
        }
        for (tool, package) in [("ccache", "ccache"), ("gcc", "gcc")] {
            match Command::new(tool).arg("--version").output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => missing.push(format!(
                    "`{tool} --version` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )),
                Err(e) => missing.push(format!(
                    "`{tool}` cannot be run ({e}); install it: apt-get install {package}"
                )),
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("\n  "))
        }
    });
    if let Err(msg) = result {
        panic!("casfs mount tests cannot run (they never skip):\n  {msg}");
    }
}

/// The daemon's log level in tests: `CASFS_TEST_LOG` (`info` when unset;
/// `debug` logs every namespace decision, for chasing a failure together
/// with `CASFS_TEST_KEEP`, which keeps a failing test's directory).
pub fn test_log_level() -> String {
    std::env::var("CASFS_TEST_LOG").unwrap_or_else(|_| "info".into())
}

/// The FUSE transport the mount tests use: `CASFS_TEST_TRANSPORT` (`dev`
/// when unset). `uring` fails the test at once (never skips) when the
/// kernel does not offer FUSE over io_uring.
pub fn test_transport() -> &'static str {
    static CHOSEN: OnceLock<Result<&'static str, String>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| match std::env::var("CASFS_TEST_TRANSPORT").as_deref() {
        Err(_) | Ok("") | Ok("dev") => Ok("dev"),
        Ok("auto") => Ok("auto"),
        Ok("uring") => {
            let param = "/sys/module/fuse/parameters/enable_uring";
            match fs::read_to_string(param) {
                Ok(v) if v.trim() == "Y" => Ok("uring"),
                Ok(_) => Err(format!(
                    "CASFS_TEST_TRANSPORT=uring but {param} is N: enable FUSE over io_uring \
                         with `echo 1 > {param}` (as root)"
                )),
                Err(e) => Err(format!(
                    "CASFS_TEST_TRANSPORT=uring but {param}: {e} (the kernel needs \
                         Linux 6.14+ with CONFIG_FUSE_IO_URING)"
                )),
            }
        }
        Ok(other) => Err(format!(
            "CASFS_TEST_TRANSPORT={other:?} is not a transport (dev, uring or auto)"
        )),
    });
    match chosen {
        Ok(t) => t,
        Err(msg) => panic!("casfs mount tests cannot run (they never skip):\n  {msg}"),
    }
}

// ---------------------------------------------------------------------------
// Temp dirs and mount table
// ---------------------------------------------------------------------------

/// A unique directory `/tmp/casfs-test-<tag>-<pid>-<n>-<nanos>`, removed on
/// drop once nothing below it is mounted.
pub struct TestDir {
    pub root: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let root = PathBuf::from(format!("/tmp/casfs-test-{tag}-{}", unique_suffix()));
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {root:?}: {e}"));
        TestDir { root }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// An existing empty directory `rel` below the root.
    pub fn dir(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {p:?}: {e}"));
        p
    }

    /// The store directory (created empty; the daemon initialises it).
    pub fn store(&self) -> PathBuf {
        self.dir("store")
    }

    /// An empty mountpoint directory.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.dir(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        for mp in mounts_under(&self.root) {
            force_unmount(&mp);
        }
        if thread::panicking() && std::env::var_os("CASFS_TEST_KEEP").is_some() {
            eprintln!("TestDir: kept {:?} (CASFS_TEST_KEEP is set)", self.root);
            return;
        }
        for mp in mounts_under(&self.root) {
            force_unmount(&mp);
        }
        let left = mounts_under(&self.root);
        if !left.is_empty() {
            eprintln!(
                "TestDir: not removing {:?}, still mounted below it: {left:?}",
                self.root
            );
            return;
        }
        make_writable(&self.root);
        if let Err(e) = fs::remove_dir_all(&self.root) {
            eprintln!("TestDir: could not remove {:?}: {e}", self.root);
        }
    }
}

/// Gives the owner write permission on every directory below `p`, so a store
/// with read-only blob directories can be removed when not running as root.
fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(p) else {
        return;
    };
    if meta.is_dir() {
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o700));
        }
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

fn unescape_mount_field(s: &str) -> String {
    // /proc/mounts escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (from /proc/self/mounts) equal to or below `root`.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(mp) = line.split(' ').nth(1) else {
            continue;
        };
        let mp = PathBuf::from(unescape_mount_field(mp));
        if mp.starts_with(root) {
            out.push(mp);
        }
    }
    // Deepest first, so nested mounts go before their parents.
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// How many mounts are stacked on `mp` right now.
pub fn mount_count(mp: &Path) -> usize {
    let text = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter(|line| {
            line.split(' ')
                .nth(1)
                .is_some_and(|f| Path::new(&unescape_mount_field(f)) == mp)
        })
        .count()
}

/// Whether the top mount on `mp` is a FUSE mount whose daemon is gone
/// (`statfs` always reaches the daemon, and a dead connection answers ENOTCONN).
pub fn is_dead_mount(mp: &Path) -> bool {
    let c = cpath(mp);
    // SAFETY: `c` is a valid C string and `buf` is a properly sized statfs.
    let rc = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut buf)
    };
    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Whether `mp` is currently a mount point.
pub fn is_mounted(mp: &Path) -> bool {
    mount_count(mp) > 0
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Lazily detaches `mp` with whatever tool works; errors are ignored (this is
/// cleanup, the test has already passed or failed).
pub fn force_unmount(mp: &Path) {
    let attempts: [(&str, &[&str]); 3] = [
        ("umount", &["-l"]),
        ("fusermount3", &["-uz"]),
        ("fusermount", &["-uz"]),
    ];
    for (tool, args) in attempts {
        if !is_mounted(mp) {
            return;
        }
        let _ = Command::new(tool)
            .args(args)
            .arg(mp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Unmounts with the system tool a user would use: `umount` as root,
/// `fusermount3 -u` otherwise.
pub fn system_umount(mp: &Path) -> Output {
    let mut cmd = if is_root() {
        Command::new("umount")
    } else {
        let mut c = Command::new("fusermount3");
        c.arg("-u");
        c
    };
    cmd.arg(mp)
        .output()
        .unwrap_or_else(|e| panic!("run umount {mp:?}: {e}"))
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// Runs `casfs ARGS...` (not `mount`) to completion.
pub fn casfs(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(CASFS_BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {CASFS_BIN} {args:?}: {e}"))
}

pub fn output_text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running `casfs mount` daemon. Dropping it kills the daemon if it is
/// still running, unmounts the mountpoint, and prints the daemon's log if the
/// test is failing.
pub struct Mount {
    pub mountpoint: PathBuf,
    pub store: PathBuf,
    pub log_path: PathBuf,
    child: Arc<Mutex<Child>>,
    pid: u32,
    status: Option<ExitStatus>,
    watchdog_stop: Arc<AtomicBool>,
    /// Mounts already on the mountpoint before this daemon started (another
    /// test daemon's, when a mount must be refused): readiness needs one more.
    mounts_before: usize,
}

impl Mount {
    /// Starts `casfs mount --store STORE EXTRA... MOUNTPOINT` and waits until
    /// `MOUNTPOINT/.casfs/stats` can be read.
    pub fn start(store: &Path, mountpoint: &Path, extra: &[&str]) -> Mount {
        let mut m = Mount::spawn(store, mountpoint, extra);
        m.wait_ready();
        m
    }

    /// Starts the daemon without waiting for it to be ready.
    pub fn spawn(store: &Path, mountpoint: &Path, extra: &[&str]) -> Mount {
        Mount::spawn_with(store, mountpoint, extra, |_, _| {})
    }

    /// `spawn`, with `setup` adjusting the command first (environment,
    /// descriptors); it also gets the log file, the daemon's stdout and
    /// stderr.
    pub fn spawn_with(
        store: &Path,
        mountpoint: &Path,
        extra: &[&str],
        setup: impl FnOnce(&mut Command, &Path),
    ) -> Mount {
        require_tools();
        let mounts_before = mount_count(mountpoint);
        let log_dir = mountpoint.parent().unwrap_or(Path::new("/tmp"));
        let name = mountpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mnt".into());
        let log_path = log_dir.join(format!("{name}-daemon-{}.log", unique_suffix()));
        let log =
            fs::File::create(&log_path).unwrap_or_else(|e| panic!("create {log_path:?}: {e}"));
        let log2 = log.try_clone().unwrap();
        let mut cmd = Command::new(CASFS_BIN);
        cmd.arg("mount").arg("--store").arg(store);
        if !extra.contains(&"--transport") {
            cmd.arg("--transport").arg(test_transport());
        }
        cmd.args(extra)
            .arg(mountpoint)
            .env("RUST_LOG", test_log_level())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        setup(&mut cmd, &log_path);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {CASFS_BIN} mount: {e}"));
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        let watchdog_stop = Arc::new(AtomicBool::new(false));
        {
            let child = Arc::clone(&child);
            let stop = Arc::clone(&watchdog_stop);
            let mp = mountpoint.to_path_buf();
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(WATCHDOG_S);
                while !stop.load(Ordering::SeqCst) {
                    if Instant::now() >= deadline {
                        let mut c = child.lock().unwrap();
                        if matches!(c.try_wait(), Ok(None)) {
                            eprintln!(
                                "WATCHDOG: casfs daemon pid {pid} on {mp:?} still running after \
                                 {WATCHDOG_S} s; killing it so blocked requests fail"
                            );
                            let _ = c.kill();
                        }
                        return;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            });
        }
        Mount {
            mountpoint: mountpoint.to_path_buf(),
            store: store.to_path_buf(),
            log_path,
            child,
            pid,
            status: None,
            watchdog_stop,
            mounts_before,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The daemon's stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        if log.len() <= LOG_TAIL_BYTES_MAX {
            return log;
        }
        let mut start = log.len() - LOG_TAIL_BYTES_MAX;
        while !log.is_char_boundary(start) {
            start += 1;
        }
        format!("...\n{}", &log[start..])
    }

    /// The exit status if the daemon has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let mut c = self.child.lock().unwrap();
            if let Ok(Some(st)) = c.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Waits until `.casfs/stats` can be read; fails if the daemon exits or
    /// takes longer than `READY_TIMEOUT_S`.
    pub fn wait_ready(&mut self) {
        let stats = self.mountpoint.join(".casfs/stats");
        let deadline = Instant::now() + Duration::from_secs(READY_TIMEOUT_S);
        loop {
            if let Some(st) = self.try_status() {
                panic!(
                    "casfs mount on {:?} exited ({st}) before it was ready; its output:\n{}",
                    self.mountpoint,
                    self.log()
                );
            }
            if mount_count(&self.mountpoint) > self.mounts_before && fs::read(&stats).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "casfs mount on {:?} not ready after {READY_TIMEOUT_S} s ({stats:?} not \
                     readable); its output:\n{}",
                    self.mountpoint,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the daemon to exit; fails after `timeout_s`.
    pub fn wait_exit(&mut self, timeout_s: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        loop {
            if let Some(st) = self.try_status() {
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "casfs daemon pid {} on {:?} still running {timeout_s} s after it should \
                     have exited; its output:\n{}",
                    self.pid,
                    self.mountpoint,
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `casfs unmount MOUNTPOINT`, then asserts the daemon exits 0 and the
    /// mountpoint is no longer mounted.
    pub fn unmount(&mut self) {
        let out = casfs(&["unmount".as_ref(), self.mountpoint.as_os_str()]);
        assert!(
            out.status.success(),
            "casfs unmount {:?} failed:\n{}\ndaemon output:\n{}",
            self.mountpoint,
            output_text(&out),
            self.log_tail()
        );
        let st = self.wait_exit(EXIT_TIMEOUT_S);
        assert!(
            st.success(),
            "casfs daemon exited with {st} after `casfs unmount` (expected 0); its output:\n{}",
            self.log_tail()
        );
        assert!(
            !is_mounted(&self.mountpoint),
            "{:?} still mounted after casfs unmount",
            self.mountpoint
        );
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2); the pid is our own unreaped child.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid,
            io::Error::last_os_error()
        );
    }

    /// `kill -9` the daemon and reap it; the mount is left dead.
    pub fn kill9(&mut self) {
        let mut c = self.child.lock().unwrap();
        c.kill().expect("SIGKILL the daemon");
        let st = c.wait().expect("reap the daemon");
        self.status = Some(st);
    }

    // -- statistics files ---------------------------------------------------

    pub fn casfs_file(&self, name: &str) -> PathBuf {
        self.mountpoint.join(".casfs").join(name)
    }

    pub fn stats_text(&self) -> String {
        read_text(&self.casfs_file("stats"))
    }

    pub fn stats_json(&self) -> String {
        read_text(&self.casfs_file("stats.json"))
    }

    pub fn metrics(&self) -> String {
        read_text(&self.casfs_file("metrics"))
    }

    /// An integer counter from `.casfs/stats.json`; fails if it is missing.
    pub fn counter(&self, key: &str) -> u64 {
        let json = self.stats_json();
        json_u64(&json, key)
            .unwrap_or_else(|| panic!("stats.json has no integer key {key:?}:\n{json}"))
    }

    /// Several counters read from one snapshot of stats.json.
    pub fn counters(&self, keys: &[&str]) -> BTreeMap<String, u64> {
        let json = self.stats_json();
        keys.iter()
            .map(|k| {
                let v = json_u64(&json, k)
                    .unwrap_or_else(|| panic!("stats.json has no integer key {k:?}:\n{json}"));
                (k.to_string(), v)
            })
            .collect()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.watchdog_stop.store(true, Ordering::SeqCst);
        if self.try_status().is_none() {
            // Ask politely first so the daemon can unmount; then insist.
            // SAFETY: plain kill(2) on our own unreaped child.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.try_status().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if self.try_status().is_none() {
                let mut c = self.child.lock().unwrap();
                let _ = c.kill();
                if let Ok(st) = c.wait() {
                    self.status = Some(st);
                }
            }
        }
        // The daemon is gone now, so its mount is either unmounted or dead.
        // Clear a dead top mount; leave a live one alone: it belongs to another
        // daemon (one that was there first, or a later one on the same
        // mountpoint after this one was unmounted).
        for _ in 0..3 {
            if !is_dead_mount(&self.mountpoint) {
                break;
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .stderr(Stdio::null())
                .status();
            if is_dead_mount(&self.mountpoint) {
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.mountpoint)
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if thread::panicking() {
            eprintln!(
                "---- casfs daemon pid {} on {:?} (store {:?}), {:?}, output:\n{}\n---- end of \
                 daemon output",
                self.pid,
                self.mountpoint,
                self.store,
                self.status,
                self.log_tail()
            );
        }
    }
}

/// Spawns `casfs mount` with arguments that must be refused, and returns its
/// output once it exits non-zero. Fails if it exits 0 or is still running
/// after `EXIT_TIMEOUT_S` (then it is killed and unmounted).
pub fn expect_mount_refused(store: &Path, mountpoint: &Path, extra: &[&str], why: &str) -> String {
    let mut m = Mount::spawn(store, mountpoint, extra);
    let deadline = Instant::now() + Duration::from_secs(EXIT_TIMEOUT_S);
    loop {
        if let Some(st) = m.try_status() {
            let log = m.log();
            assert!(
                !st.success(),
                "casfs mount ({why}) exited 0; it must be refused with a non-zero exit. \
                 Output:\n{log}"
            );
            return log;
        }
        if Instant::now() >= deadline {
            panic!(
                "casfs mount ({why}) is still running after {EXIT_TIMEOUT_S} s; it must be \
                 refused. Output:\n{}",
                m.log()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Files, errno, mtimes
// ---------------------------------------------------------------------------

pub fn read_text(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {p:?}: {e}"))
}

/// Writes `data` to `dir/<tmp_name>` and renames it onto `dir/<name>`,
/// asserting both succeed (ccache's way of publishing an entry).
pub fn publish(dir: &Path, tmp_name: &str, name: &str, data: &[u8]) {
    let tmp = dir.join(tmp_name);
    fs::write(&tmp, data).unwrap_or_else(|e| panic!("write {tmp:?}: {e}"));
    let dst = dir.join(name);
    fs::rename(&tmp, &dst).unwrap_or_else(|e| panic!("rename {tmp:?} -> {dst:?}: {e}"));
}

/// Deterministic bytes of length `len` that differ with `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// The errno of a failed result; fails the test if it succeeded.
pub fn errno_of<T: std::fmt::Debug>(r: io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected an error"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    }
}

pub fn errno_name(e: i32) -> String {
    let names = [
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::EACCES, "EACCES"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EROFS, "EROFS"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::ESTALE, "ESTALE"),
        (libc::EBADF, "EBADF"),
        (libc::EBUSY, "EBUSY"),
    ];
    names
        .iter()
        .find(|(n, _)| *n == e)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("errno {e}"))
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// mtime in nanoseconds since the epoch (from `stat`).
pub fn mtime_ns(p: &Path) -> i128 {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("stat {p:?}: {e}"));
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// `utimensat(AT_FDCWD, p, times, 0)`; `None` passes a NULL `times` (touch).
pub fn utimensat(p: &Path, times: Option<[libc::timespec; 2]>) -> io::Result<()> {
    let c = cpath(p);
    let ptr = match &times {
        Some(t) => t.as_ptr(),
        None => std::ptr::null(),
    };
    // SAFETY: `c` is a valid C string and `ptr` is NULL or points at 2 timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ptr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn timespec(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    }
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`.
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: both are valid C strings.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Names of the entries of `dir`, sorted.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Tiny JSON and Prometheus readers (no serde on purpose)
// ---------------------------------------------------------------------------

/// The first non-negative integer value of `"key":` in `json`.
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\"");
    let mut from = 0;
    while let Some(pos) = json[from..].find(&pat) {
        let after = from + pos + pat.len();
        let rest = json[after..].trim_start();
        if let Some(r) = rest.strip_prefix(':') {
            let r = r.trim_start();
            let digits: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
            if !digits.is_empty() {
                return digits.parse().ok();
            }
        }
        from = after;
    }
    None
}

/// The `"name": integer` pairs of the flat object under `"key":` in `json`.
pub fn json_object_u64s(json: &str, key: &str) -> Option<Vec<(String, u64)>> {
    let pat = format!("\"{key}\"");
    let pos = json.find(&pat)?;
    let rest = json[pos + pat.len()..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let body = rest.strip_prefix('{')?;
    let end = body.find('}')?;
    let body = &body[..end];
    let mut out = Vec::new();
    for item in body.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (k, v) = item.split_once(':')?;
        let k = k.trim().trim_matches('"').to_string();
        let v: u64 = v.trim().parse().ok()?;
        out.push((k, v));
    }
    Some(out)
}

/// Parses Prometheus text format lines `name value` (comments skipped).
/// Returns the lines that do not parse as the error.
pub fn parse_metrics(text: &str) -> Result<BTreeMap<String, f64>, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut bad = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (
            parts.next(),
            parts.next().and_then(|v| v.parse::<f64>().ok()),
        ) {
            (Some(name), Some(v)) => {
                out.insert(name.to_string(), v);
            }
            _ => bad.push(line.to_string()),
        }
    }
    if bad.is_empty() {
        Ok(out)
    } else {
        Err(bad)
    }
}

// ---------------------------------------------------------------------------
// ccache and gcc
// ---------------------------------------------------------------------------

/// The directory with the C sources compiled by the ccache tests.
pub fn csrc_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/csrc"))
}

/// The `.c` files in `tests/csrc`, sorted.
pub fn sources() -> Vec<PathBuf> {
    let dir = csrc_dir();
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    v.sort();
    assert!(
        v.len() >= 10,
        "expected at least 10 C sources in {dir:?}, found {v:?}"
    );
    v
}

/// One compile: `SRC` with `-DCASFS_VARIANT=variant` into `obj` (a file
/// name, placed in the output directory of the build).
#[derive(Clone, Debug)]
pub struct Job {
    pub src: PathBuf,
    pub variant: u32,
    pub obj: String,
}

/// Every source once per variant.
pub fn jobs(variants: &[u32]) -> Vec<Job> {
    let mut v = Vec::new();
    for &variant in variants {
        for src in sources() {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            v.push(Job {
                obj: format!("{stem}-v{variant}.o"),
                src,
                variant,
            });
        }
    }
    v
}

/// The gcc arguments of a job (the same with and without ccache).
fn gcc_args(job: &Job, out_dir: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "-O2".into(),
        format!("-DCASFS_VARIANT={}", job.variant).into(),
        "-I".into(),
        csrc_dir().into(),
        "-c".into(),
        job.src.clone().into(),
        "-o".into(),
        out_dir.join(&job.obj).into(),
    ]
}

/// ccache pointed at one cache directory, isolated from the caller's
/// configuration and environment.
pub struct Ccache {
    pub dir: PathBuf,
    config: PathBuf,
}

impl Ccache {
    /// `scratch` holds the empty configuration file (outside the mount).
    pub fn new(dir: &Path, scratch: &Path) -> Ccache {
        require_tools();
        let config = scratch.join(format!("ccache-empty-{}.conf", unique_suffix()));
        fs::write(&config, b"").unwrap_or_else(|e| panic!("write {config:?}: {e}"));
        Ccache {
            dir: dir.to_path_buf(),
            config,
        }
    }

    /// `ccache` with CCACHE_DIR set, every other `CCACHE_*` variable removed,
    /// an empty configuration file and `/` as working directory.
    pub fn command(&self) -> Command {
        let mut c = Command::new("ccache");
        for (k, _) in std::env::vars_os() {
            if k.as_bytes().starts_with(b"CCACHE_") {
                c.env_remove(k);
            }
        }
        c.env("CCACHE_DIR", &self.dir)
            .env("CCACHE_CONFIGPATH", &self.config)
            .current_dir("/")
            .stdin(Stdio::null());
        c
    }

    /// Runs `ccache ARGS` and asserts it succeeds.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self
            .command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run ccache {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ccache {args:?} with CCACHE_DIR={:?} failed:\n{}",
            self.dir,
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn zero_stats(&self) {
        self.run(&["-z"]);
    }

    pub fn print_stats(&self) -> CcacheStats {
        let text = self.run(&["--print-stats"]);
        let mut map = BTreeMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('\t') {
                if let Ok(v) = v.trim().parse::<u64>() {
                    map.insert(k.to_string(), v);
                }
            }
        }
        CcacheStats { map, text }
    }
}

/// `ccache --print-stats` output (TAB separated `key\tvalue` lines).
pub struct CcacheStats {
    pub map: BTreeMap<String, u64>,
    pub text: String,
}

impl CcacheStats {
    pub fn get(&self, key: &str) -> u64 {
        *self
            .map
            .get(key)
            .unwrap_or_else(|| panic!("ccache --print-stats has no {key:?}:\n{}", self.text))
    }

    pub fn hits(&self) -> u64 {
        self.get("direct_cache_hit") + self.get("preprocessed_cache_hit")
    }

    pub fn direct_hits(&self) -> u64 {
        self.get("direct_cache_hit")
    }

    pub fn misses(&self) -> u64 {
        self.get("cache_miss")
    }

    /// The non-zero counters, for failure messages.
    pub fn summary(&self) -> String {
        self.map
            .iter()
            .filter(|(k, v)| **v != 0 && !k.ends_with("timestamp"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The outcome of one compile.
#[derive(Debug)]
pub struct CompileResult {
    pub job: Job,
    pub success: bool,
    pub output: String,
}

/// Completed compiles so far, in completion order (index into the job list,
/// success), shared with a thread watching a build.
pub type Progress = Mutex<Vec<(usize, bool)>>;

/// Compiles `jobs` into `out_dir` with `parallel` workers, through `ccache`
/// (`ccache gcc ...`) or with plain `gcc` when `ccache` is `None`.
pub fn compile_all(
    ccache: Option<&Ccache>,
    jobs: &[Job],
    out_dir: &Path,
    parallel: usize,
) -> Vec<CompileResult> {
    compile_all_with_progress(ccache, jobs, out_dir, parallel, None)
}

pub fn compile_all_with_progress(
    ccache: Option<&Ccache>,
    jobs: &[Job],
    out_dir: &Path,
    parallel: usize,
    progress: Option<&Progress>,
) -> Vec<CompileResult> {
    require_tools();
    fs::create_dir_all(out_dir).unwrap_or_else(|e| panic!("create {out_dir:?}: {e}"));
    run_jobs(jobs, parallel, progress, |job| {
        let mut cmd = match ccache {
            Some(cc) => {
                let mut c = cc.command();
                c.arg("gcc");
                c
            }
            None => {
                let mut c = Command::new("gcc");
                c.current_dir("/").stdin(Stdio::null());
                c
            }
        };
        cmd.args(gcc_args(job, out_dir));
        cmd
    })
}

/// Runs one command per job, `parallel` at a time, in job order.
fn run_jobs(
    jobs: &[Job],
    parallel: usize,
    progress: Option<&Progress>,
    command: impl Fn(&Job) -> Command + Sync,
) -> Vec<CompileResult> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<CompileResult>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(job) = jobs.get(i) else {
                    return;
                };
                let (success, output) = match command(job).output() {
                    Ok(out) => (out.status.success(), output_text(&out)),
                    Err(e) => (false, format!("spawn failed: {e}")),
                };
                if let Some(p) = progress {
                    p.lock().unwrap().push((i, success));
                }
                results.lock().unwrap()[i] = Some(CompileResult {
                    job: job.clone(),
                    success,
                    output,
                });
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect()
}

pub fn assert_all_compiled(results: &[CompileResult], what: &str) {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.success)
        .map(|r| {
            format!(
                "{} (variant {}):\n{}",
                r.job.src.display(),
                r.job.variant,
                r.output
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} compiles failed:\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
}

/// Compiles `jobs` with plain gcc into `out_dir` (the reference objects).
pub fn gcc_reference(jobs: &[Job], out_dir: &Path) {
    let results = compile_all(None, jobs, out_dir, 4);
    assert_all_compiled(&results, "plain gcc reference build");
}

/// Asserts every job's object in `dir` is byte-for-byte the one in `reference`.
pub fn assert_objects_identical(jobs: &[Job], dir: &Path, reference: &Path, what: &str) {
    let mut bad = Vec::new();
    for job in jobs {
        let a = dir.join(&job.obj);
        let b = reference.join(&job.obj);
        match (fs::read(&a), fs::read(&b)) {
            (Ok(x), Ok(y)) if x == y => {}
            (Ok(x), Ok(y)) => bad.push(format!(
                "{}: {} bytes vs gcc's {} bytes, first difference at byte {}",
                job.obj,
                x.len(),
                y.len(),
                x.iter()
                    .zip(&y)
                    .position(|(p, q)| p != q)
                    .unwrap_or(x.len().min(y.len()))
            )),
            (Err(e), _) => bad.push(format!("{}: cannot read {a:?}: {e}", job.obj)),
            (_, Err(e)) => bad.push(format!("{}: cannot read reference {b:?}: {e}", job.obj)),
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} objects differ from plain gcc's:\n{}",
        bad.len(),
        jobs.len(),
        bad.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Operator tooling (mount-helpers/): programs, mount table entries, daemons
// started by someone else (mount(8) through mount.casfs), other users
// ---------------------------------------------------------------------------

/// The directory with the operator's scripts (`mount.casfs`, `casfs-chroots`,
/// `install`, the systemd unit).
pub fn helpers_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/mount-helpers"))
}

/// Where `program` is on PATH (or the standard system directories, which
/// mount(8) uses whatever PATH says), if anywhere.
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Fails (never skips) when one of `programs` (program, Debian package) is
/// missing, naming the package to install.
pub fn require_programs(programs: &[(&str, &str)]) {
    require_tools();
    let missing: Vec<String> = programs
        .iter()
        .filter(|(p, _)| find_program(p).is_none())
        .map(|(p, pkg)| format!("`{p}` is not installed (apt-get install {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "casfs mount-helper tests cannot run (they never skip):\n  {}",
        missing.join("\n  ")
    );
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug)]
pub struct MountInfo {
    pub id: u64,
    /// `major:minor`: a bind mount has the device of what it binds.
    pub dev: String,
    /// The directory of the filesystem mounted here (`/` for a whole mount).
    pub root: String,
    pub mountpoint: PathBuf,
    pub mount_options: String,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// The top mount on `mp` (the last one stacked there), if any.
pub fn top_mount(mp: &Path) -> Option<MountInfo> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut top = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < sep + 4 || f.len() < 6 {
            continue;
        }
        let mountpoint = PathBuf::from(unescape_mount_field(f[4]));
        if mountpoint != mp {
            continue;
        }
        top = Some(MountInfo {
            id: f[0].parse().unwrap_or(0),
            dev: f[2].to_string(),
            root: unescape_mount_field(f[3]),
            mountpoint,
            mount_options: f[5].to_string(),
            fstype: f[sep + 1].to_string(),
            source: unescape_mount_field(f[sep + 2]),
            super_options: f[sep + 3].to_string(),
        });
    }
    top
}

/// Whether process `pid` exists and is not a zombie (a daemon whose parent,
/// a mount helper, has exited is reaped by init, which may take its time).
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// A process's argument vector.
pub fn process_cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The live `casfs mount ... MOUNTPOINT` daemons serving `mp` (whoever started
/// them), found in /proc.
pub fn casfs_daemons_for(mp: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let argv = process_cmdline(pid);
        let is_casfs = argv
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "casfs"));
        if is_casfs
            && argv.get(1).is_some_and(|a| a == "mount")
            && argv.last().is_some_and(|a| Path::new(a) == mp)
            && process_alive(pid)
        {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

/// A casfs daemon that another program started (mount(8) through
/// `mount.casfs`), so not our child: found by its command line. Dropping it
/// unmounts the mountpoint if it is still mounted, stops the daemon (SIGTERM,
/// then SIGKILL after 3 s) and clears a dead mount, and prints its log if the
/// test is failing.
pub struct ForeignDaemon {
    pub mountpoint: PathBuf,
    pub pid: u32,
    /// Where its stdout goes (the helper's log file), if it is a file.
    pub log_path: Option<PathBuf>,
}

impl ForeignDaemon {
    /// The one daemon serving `mp`; fails if there is none or more than one.
    pub fn find(mp: &Path) -> ForeignDaemon {
        let pids = casfs_daemons_for(mp);
        assert!(
            pids.len() == 1,
            "expected exactly one `casfs mount` daemon serving {mp:?}, found {pids:?} \
             (mount table entry: {:?})",
            top_mount(mp)
        );
        let pid = pids[0];
        let log_path = fs::read_link(format!("/proc/{pid}/fd/1"))
            .ok()
            .filter(|p| p.is_absolute() && p.is_file());
        ForeignDaemon {
            mountpoint: mp.to_path_buf(),
            pid,
            log_path,
        }
    }

    pub fn log(&self) -> String {
        match &self.log_path {
            Some(p) => {
                fs::read_to_string(p).unwrap_or_else(|e| format!("<cannot read {p:?}: {e}>"))
            }
            None => "<the daemon's output does not go to a file>".to_string(),
        }
    }

    /// Waits until the daemon has exited; fails after `timeout_s`.
    pub fn wait_exit(&self, timeout_s: u64) {
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        while process_alive(self.pid) {
            if Instant::now() >= deadline {
                panic!(
                    "casfs daemon pid {} on {:?} still running {timeout_s} s after it should have \
                     exited; its log:\n{}",
                    self.pid,
                    self.mountpoint,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ForeignDaemon {
    fn drop(&mut self) {
        if process_alive(self.pid) {
            if is_mounted(&self.mountpoint) && !is_dead_mount(&self.mountpoint) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .stderr(Stdio::null())
                    .status();
            }
            // SAFETY: plain kill(2); at worst the pid is gone already.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while process_alive(self.pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if process_alive(self.pid) {
                // SAFETY: as above.
                unsafe {
                    libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
                }
                let deadline = Instant::now() + Duration::from_secs(3);
                while process_alive(self.pid) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
        for _ in 0..3 {
            if !is_dead_mount(&self.mountpoint) {
                break;
            }
            force_unmount(&self.mountpoint);
        }
        if thread::panicking() {
            eprintln!(
                "---- casfs daemon pid {} on {:?} (started by mount.casfs), log {:?}:\n{}\n---- end \
                 of daemon log",
                self.pid,
                self.mountpoint,
                self.log_path,
                self.log()
            );
        }
    }
}

/// A `setpriv` command that runs what follows as `uid`:`gid` with exactly
/// the supplementary `groups` (none if empty); append `--` and the program.
pub fn as_user(uid: u32, gid: u32, groups: &[u32]) -> Command {
    require_programs(&[("setpriv", "util-linux")]);
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.arg(format!("--groups={}", list.join(",")));
    }
    c
}

/// The uid and primary gid of user `name` (e.g. `nobody`); fails if there is
/// no such user.
pub fn user_ids(name: &str) -> (u32, u32) {
    let c = CString::new(name).unwrap();
    // SAFETY: getpwnam returns NULL or a pointer to a static passwd record,
    // read at once (the tests do not call getpw* concurrently on other names
    // in a way that matters: the values are copied out immediately).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    assert!(
        !pw.is_null(),
        "no user {name:?} on this machine (/etc/passwd)"
    );
    // SAFETY: non-NULL pointer from getpwnam.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// The gid of group `name` (e.g. `nogroup`); fails if there is no such group.
pub fn group_id(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: as in `user_ids`.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    assert!(
        !gr.is_null(),
        "no group {name:?} on this machine (/etc/group)"
    );
    // SAFETY: non-NULL pointer from getgrnam.
    unsafe { (*gr).gr_gid }
}

/// `gcc_args`, but with the include directory next to the job's source
/// (a copy the other user can read; the checkout may not be readable to it).
fn user_gcc_args(job: &Job, out_dir: &Path) -> Vec<std::ffi::OsString> {
    let include = job
        .src
        .parent()
        .expect("sources live in a directory")
        .to_path_buf();
    gcc_args(job, out_dir)
        .into_iter()
        .map(|a| {
            if Path::new(&a) == csrc_dir() {
                include.clone().into_os_string()
            } else {
                a
            }
        })
        .collect()
}

/// Like `compile_all`, through `ccache`, but every compile runs as `uid`:`gid`
/// with no supplementary groups (`setpriv --reuid --regid --clear-groups`),
/// with the same environment `Ccache::command` sets. The sources, the
/// output directory and the ccache configuration file must be readable (and
/// the output directory writable) by that user.
pub fn compile_all_as_user(
    ccache: &Ccache,
    jobs: &[Job],
    out_dir: &Path,
    parallel: usize,
    uid: u32,
    gid: u32,
) -> Vec<CompileResult> {
    require_programs(&[("setpriv", "util-linux")]);
    run_jobs(jobs, parallel, None, |job| {
        let base = ccache.command();
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg("ccache")
            .arg("gcc")
            .args(user_gcc_args(job, out_dir));
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    })
}

/// A `redis-server` on a loopback port, stopped on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// `requirepass`, if the server wants one.
    password: Option<String>,
}

impl Redis {
    /// Starts one on a free loopback port.
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::start_on(port)
    }

    /// Starts one on `port` (empty: no persistence).
    pub fn start_on(port: u16) -> Redis {
        let mut r = Redis {
            child: None,
            port,
            password: None,
        };
        r.restart();
        r
    }

    /// Starts one that wants `password` from its clients.
    pub fn start_with_password(password: &str) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            child: None,
            port,
            password: Some(password.to_string()),
        };
        r.restart();
        r
    }

    /// Starts it (again) on its port, empty.
    pub fn restart(&mut self) {
        assert!(
            find_program("redis-server").is_some(),
            "redis-server is not installed: these tests need it (apt-get install redis-server)"
        );
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(
                self.password
                    .iter()
                    .flat_map(|p| ["--requirepass", p.as_str()]),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends `sig` to the server (SIGSTOP: a hung server that still holds
    /// its connections; SIGCONT: it answers again).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        // SAFETY: a plain kill(2) of our own child.
        assert_eq!(
            unsafe { libc::kill(pid as libc::pid_t, sig) },
            0,
            "kill redis-server"
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: a plain kill(2) of our own child (a stopped one dies
            // of SIGKILL too, but is woken so nothing waits on it).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cli(&self, args: &[&str]) -> Vec<u8> {
        assert!(
            find_program("redis-cli").is_some(),
            "redis-cli is not installed: this test needs it (apt-get install redis-tools)"
        );
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--no-raw"])
            .envs(self.password.iter().map(|p| ("REDISCLI_AUTH", p.as_str())))
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        out.stdout
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
