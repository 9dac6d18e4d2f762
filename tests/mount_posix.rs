//! Real-mount tests of ordinary files on a generic path (not a cache
//! result): what a POSIX conformance run checks, with the real tools
//! (`mkfifo`, `mknod`, Python's `socket`, `fallocate(1)`, `truncate(1)`,
//! `dd`). Special files (fifos, sockets, device nodes) are host-local
//! metadata-only nodes that the kernel runs itself; writable files take
//! `fallocate` modes and `SEEK_DATA`/`SEEK_HOLE` as the store's filesystem
//! does; a truncate the store's filesystem refuses leaves nothing behind.
//! A time set on a file still open for writing (`cp -a`) survives its close
//! and publication, in every class. Permissions for a user other than the
//! owner (chown, setuid/setgid clearing, setgid outside the group,
//! `ftruncate`, moving directories) are checked against the same program
//! run on the local disk as the same user. The deliberate differences from a local filesystem are listed in the
//! doc/semantics.md (*Differences from a local filesystem*).

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

/// Hang detection only: a fifo or socket that never connects fails the
/// test instead of hanging the suite (the daemon's watchdog is longer).
const SCRIPT_TIMEOUT_S: u32 = 60;

fn mounted(tag: &str) -> (TestDir, Mount) {
    let td = TestDir::new(tag);
    let m = Mount::start(&td.store(), &td.mountpoint("mnt"), &[]);
    (td, m)
}

/// Runs `script` with `sh -e` in `dir` under a hang watchdog; fails the test
/// with the script's output if it fails.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("timeout")
        .arg(SCRIPT_TIMEOUT_S.to_string())
        .args(["sh", "-ec", script])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run sh (coreutils `timeout` needed): {e}"));
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "script failed in {dir:?} ({}):\n{script}\n{text}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like `sh`, but the script is expected to fail: returns its stderr.
fn sh_fails(dir: &Path, script: &str) -> String {
    let out = Command::new("timeout")
        .arg(SCRIPT_TIMEOUT_S.to_string())
        .args(["sh", "-c", script])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run sh: {e}"));
    assert!(
        !out.status.success(),
        "script should have failed in {dir:?}:\n{script}\n{}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn python(dir: &Path, program: &str) -> String {
    let out = Command::new("timeout")
        .arg(SCRIPT_TIMEOUT_S.to_string())
        .args(["python3", "-c", program])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run python3 (needed by the tests): {e}"));
    assert!(
        out.status.success(),
        "python3 failed in {dir:?} ({}):\n{program}\n{}",
        out.status,
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes allocated on disk by the files in the store's `staging/`.
fn staging_bytes(store: &Path) -> u64 {
    fs::read_dir(store.join("staging"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[test]
fn fifo_carries_bytes_between_two_processes_and_stays_after_remount() {
    let td = TestDir::new("fifo");
    let (store, mp) = (td.store(), td.mountpoint("mnt"));
    let mut m = Mount::start(&store, &mp, &[]);
    fs::create_dir(mp.join("work")).unwrap();
    let dir = mp.join("work");
    let out = sh(
        &dir,
        "mkfifo -m 0640 pipe
         test -p pipe
         stat -c '%F %a' pipe
         ( printf 'through the fifo\\n' > pipe ) &
         read line < pipe
         wait
         echo \"$line\"",
    );
    assert_eq!(out, "fifo 640\nthrough the fifo\n");
    m.unmount();
    drop(m);
    let out = casfs(&["fsck".as_ref(), "--store".as_ref(), store.as_os_str()]);
    assert!(
        out.status.success(),
        "fsck of a store holding a fifo:\n{}",
        output_text(&out)
    );

    let _m = Mount::start(&store, &mp, &[]);
    let meta = fs::symlink_metadata(dir.join("pipe")).unwrap();
    assert!(meta.file_type().is_fifo(), "after remount: {meta:?}");
    assert_eq!(meta.mode() & 0o7777, 0o640);
    // Still a working fifo, listed as one, and removable.
    let out = sh(
        &dir,
        "( echo again > pipe ) & read line < pipe; wait; echo \"$line\"
         find . -name pipe -printf '%y\\n'
         rm pipe; ls -A",
    );
    assert_eq!(out, "again\np\n");
}

#[test]
fn unix_socket_binds_and_a_second_process_connects() {
    let (td, _m) = mounted("sock");
    let dir = td.path("mnt").join("run");
    fs::create_dir(&dir).unwrap();
    let out = python(
        &dir,
        r#"
import os, socket, stat, subprocess, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("server.sock")
s.listen(1)
assert stat.S_ISSOCK(os.lstat("server.sock").st_mode), oct(os.lstat("server.sock").st_mode)
client = "import socket\nc = socket.socket(socket.AF_UNIX)\nc.connect('server.sock')\nc.sendall(b'ping')\nprint(c.recv(4).decode())"
p = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE)
conn, _ = s.accept()
got = conn.recv(4)
conn.sendall(b"pong")
out, _ = p.communicate()
assert p.returncode == 0
print(got.decode(), out.decode().strip())
os.unlink("server.sock")
print(os.listdir("."))
"#,
    );
    assert_eq!(out, "ping pong\n[]\n");
}

#[test]
fn mknod_makes_device_nodes_fifos_and_regular_files() {
    let (td, _m) = mounted("mknod");
    let dir = td.path("mnt").join("dev");
    fs::create_dir(&dir).unwrap();
    let out = sh(
        &dir,
        "umask 022
         mknod -m 0620 null c 1 3
         mknod loop0 b 7 0
         mknod pipe p
         stat -c '%n %F %t:%T %a' null loop0 pipe",
    );
    assert_eq!(
        out,
        "null character special file 1:3 620\n\
         loop0 block special file 7:0 644\n\
         pipe fifo 0:0 644\n"
    );
    // mknod(S_IFREG) makes an empty regular file that behaves as one.
    let out = python(
        &dir,
        r#"
import os, stat
os.mknod("plain", stat.S_IFREG | 0o640)
st = os.stat("plain")
print(stat.S_ISREG(st.st_mode), oct(st.st_mode & 0o7777), st.st_size)
try:
    os.mknod("plain", stat.S_IFIFO | 0o600)
except FileExistsError:
    print("EEXIST")
with open("plain", "w") as f:
    f.write("written")
print(open("plain").read())
"#,
    );
    assert_eq!(out, "True 0o640 0\nEEXIST\nwritten\n");
    // The mount is nodev: a device node is a name, never a way into a device.
    let err = sh_fails(&dir, "cat null");
    assert!(err.contains("Permission denied"), "{err}");
    // Special files are renamed, hard-linked and removed like any name.
    let out = sh(
        &dir,
        "mv pipe pipe2; ln null null2; stat -c '%h %t:%T' null2
         rm null null2 loop0 pipe2 plain; ls -A",
    );
    assert_eq!(out, "2 1:3\n");
}

#[test]
fn fallocate_punches_holes_and_preallocates_writable_files() {
    let (td, _m) = mounted("falloc");
    let mp = td.path("mnt");
    fs::create_dir(mp.join("tmp")).unwrap();
    // A generic (mutable) file, written then published at close, and a
    // host-local scratch file: both are staged while open for writing.
    for name in ["data.bin", "tmp/scratch.bin"] {
        let out = sh(
            &mp,
            &format!(
                "head -c 1048576 /dev/zero | tr '\\0' x > {name}
                 fallocate --punch-hole --offset 4096 --length 65536 {name}
                 stat -c %s {name}
                 head -c 4096 {name} | tr -d x | wc -c
                 dd if={name} bs=4096 skip=1 count=16 status=none | tr -d '\\0' | wc -c
                 tail -c +69633 {name} | tr -d x | wc -c
                 fallocate --length 4194304 {name}
                 stat -c %s {name}
                 fallocate --keep-size --offset 4194304 --length 1048576 {name}
                 stat -c %s {name}
                 fallocate --zero-range --offset 0 --length 10 {name}
                 head -c 11 {name} | od -An -c | tr -s ' '
                 tail -c 3145728 {name} | tr -d '\\0' | wc -c"
            ),
        );
        assert_eq!(
            out,
            "1048576\n0\n0\n0\n4194304\n4194304\n \\0 \\0 \\0 \\0 \\0 \\0 \\0 \\0 \\0 \\0 x\n0\n",
            "{name}"
        );
    }
    // The hole is found with SEEK_HOLE / SEEK_DATA while the file is open.
    let out = python(
        &mp,
        r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("holes.bin", os.O_CREAT | os.O_RDWR, 0o644)
os.pwrite(fd, b"a" * 8192, 0)
os.pwrite(fd, b"b" * 8192, 1 << 20)
# FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
rc = libc.fallocate(fd, 0x01 | 0x02, ctypes.c_int64(0), ctypes.c_int64(4096))
assert rc == 0, os.strerror(ctypes.get_errno())
print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 4096, os.SEEK_HOLE), os.lseek(fd, 8192, os.SEEK_DATA))
os.close(fd)
# Published at close: the holes are still there for a reader.
fd = os.open("holes.bin", os.O_RDONLY)
print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 4096, os.SEEK_HOLE), os.pread(fd, 2, 4095))
os.close(fd)
"#,
    );
    assert_eq!(out, "4096 8192 1048576\n4096 8192 b'\\x00a'\n");
}

#[test]
fn failing_truncate_returns_efbig_and_leaves_no_staged_copy() {
    let td = TestDir::new("efbig");
    let (store, mp) = (td.store(), td.mountpoint("mnt"));
    let mut m = Mount::start(&store, &mp, &[]);
    let size: usize = 8 << 20;
    let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    fs::write(mp.join("big.bin"), &content).unwrap();
    let times = |p: &Path| {
        let meta = fs::metadata(p).unwrap();
        (
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
        )
    };
    let times_before = times(&mp.join("big.bin"));
    let before = staging_bytes(&store);
    // Beyond what the store's filesystem (ext4 here: 16 TiB) can hold; the
    // kernel lets it through (FUSE's limit is 8 EiB), the daemon refuses it.
    let huge: u64 = 17 << 40;
    let out = python(
        &mp,
        &format!(
            r#"
import os
try:
    os.truncate("big.bin", {huge})
    print("truncated")
except OSError as e:
    print(os.strerror(e.errno))
"#
        ),
    );
    assert_eq!(out, "File too large\n");
    let after = staging_bytes(&store);
    assert!(
        after <= before,
        "a failing truncate left {after} bytes staged (before: {before})"
    );
    // truncate(1) opens the file for writing, then ftruncates it: nothing is
    // copied for the open, and nothing is left after the failure.
    let out = python(
        &mp,
        &format!(
            r#"
import os
fd = os.open("big.bin", os.O_WRONLY | os.O_CREAT)
print(sum(os.stat("../store/staging/" + n).st_blocks * 512 for n in os.listdir("../store/staging")) <= {before})
try:
    os.ftruncate(fd, {huge})
except OSError as e:
    print(os.strerror(e.errno))
print(sum(os.stat("../store/staging/" + n).st_blocks * 512 for n in os.listdir("../store/staging")) <= {before})
os.close(fd)
"#
        ),
    );
    assert_eq!(out, "True\nFile too large\nTrue\n");
    let err = sh_fails(&mp, &format!("truncate -s {huge} big.bin"));
    assert!(err.contains("File too large"), "{err}");
    assert!(staging_bytes(&store) <= before);
    // The file is as it was, times included (after a remount, so the
    // daemon's record is read, not the kernel's cached attributes).
    m.unmount();
    drop(m);
    let _m = Mount::start(&store, &mp, &[]);
    assert_eq!(times(&mp.join("big.bin")), times_before);
    assert_eq!(fs::read(mp.join("big.bin")).unwrap(), content);
    // A truncate the filesystem can hold still works.
    let out = sh(&mp, "truncate -s 4096 big.bin; stat -c %s big.bin");
    assert_eq!(out, "4096\n");
    assert_eq!(fs::read(mp.join("big.bin")).unwrap(), content[..4096]);
}

#[test]
fn a_write_changes_ctime_with_mtime() {
    let (td, _m) = mounted("ctime");
    let mp = td.path("mnt");
    fs::create_dir(mp.join("tmp")).unwrap();
    for name in ["notes.txt", "tmp/notes.txt"] {
        let out = sh(
            &mp,
            &format!(
                "echo one > {name}
                 chmod 600 {name}
                 echo two >> {name}
                 m=$(stat -c %Y.%y {name}); c=$(stat -c %Z.%z {name})
                 [ \"$m\" = \"$c\" ] && echo equal || echo \"mtime $m ctime $c\""
            ),
        );
        assert_eq!(out, "equal\n", "{name}");
    }
}

#[test]
fn rewinddir_lists_the_directory_afresh() {
    let (td, _m) = mounted("rewind");
    let mp = td.path("mnt");
    fs::create_dir(mp.join("d")).unwrap();
    fs::write(mp.join("d/old"), b"x").unwrap();
    let out = python(
        &mp,
        r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.opendir.restype = ctypes.c_void_p
libc.opendir.argtypes = [ctypes.c_char_p]
for f in ("readdir", "rewinddir", "closedir"):
    getattr(libc, f).argtypes = [ctypes.c_void_p]
libc.readdir.restype = ctypes.c_void_p
def count(d):
    n = 0
    while libc.readdir(d):
        n += 1
    return n
d = libc.opendir(b"d")
first = count(d)
open("d/new", "w").close()
os.unlink("d/old")
os.mkfifo("d/fifo")
libc.rewinddir(d)
second = count(d)
libc.closedir(d)
print(first, second, sorted(os.listdir("d")))
"#,
    );
    // ".", ".." and the names.
    assert_eq!(out, "3 4 ['fifo', 'new']\n");
}

#[test]
fn special_files_stay_on_their_host() {
    let td = TestDir::new("special-local");
    let url = format!("file://{}", td.dir("nfs").display());
    let (mp_a, mp_b) = (td.mountpoint("a"), td.mountpoint("b"));
    let _a = Mount::start(&td.dir("store-a"), &mp_a, &["--shared", &url]);
    let _b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    // A published file next to a fifo and a socket: the file (and its
    // directory) reach host B, the special files do not.
    sh(
        &mp_a,
        "mkdir d
         mkfifo d/pipe
         python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"d/sock\")'",
    );
    fs::write(mp_a.join("d/file"), b"shared\n").unwrap();
    let out = casfs(&["sync".as_ref(), mp_a.as_os_str()]);
    assert!(out.status.success(), "casfs sync: {}", output_text(&out));
    assert_eq!(fs::read(mp_b.join("d/file")).unwrap(), b"shared\n");
    for name in ["d/pipe", "d/sock"] {
        let err = fs::symlink_metadata(mp_b.join(name)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{name} on host B");
    }
    let out = sh(&mp_a, "find d -printf '%y %p\\n' | sort");
    assert_eq!(out, "d d\nf d/file\np d/pipe\ns d/sock\n");
}

#[test]
fn rewriting_a_published_file_in_place_publishes_once_at_close() {
    use std::io::Write;
    let td = TestDir::new("inplace");
    // The daemon logs every seal and publication with its caller: a count
    // that is off says which request published.
    let mut m = Mount::spawn_with(&td.store(), &td.mountpoint("mnt"), &[], |cmd, _| {
        cmd.env("RUST_LOG", "info,casfs::fs::publish=debug");
    });
    m.wait_ready();
    let trail = |m: &Mount| -> String {
        let log = m.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" seal ") || l.contains(" publish "))
            .collect();
        lines.join("\n")
    };
    let path = m.mountpoint.join("notes.txt");
    fs::write(&path, b"first version, long enough to notice\n").unwrap();
    let published = m.counter("publications");
    // open(O_WRONLY) + ftruncate + write, as truncate(1) and many editors
    // do: the truncated file is never published (or shared) on its own.
    let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    assert_eq!(m.counter("publications"), published, "after open");
    f.set_len(0).unwrap();
    assert_eq!(m.counter("publications"), published, "after ftruncate");
    f.write_all(b"second\n").unwrap();
    assert_eq!(m.counter("publications"), published, "after write");
    drop(f);
    assert_eq!(m.counter("publications"), published + 1, "after close");
    assert_eq!(fs::read(&path).unwrap(), b"second\n");
    // open(O_TRUNC) is a truncate through the new descriptor: the same.
    let mut f = fs::File::create(&path).unwrap();
    assert_eq!(m.counter("publications"), published + 1, "after O_TRUNC");
    f.write_all(b"third\n").unwrap();
    drop(f);
    assert_eq!(
        m.counter("publications"),
        published + 2,
        "after close; publications:\n{}",
        trail(&m)
    );
    assert_eq!(fs::read(&path).unwrap(), b"third\n");
}

// ---------------------------------------------------------------------------
// Times set through an open descriptor
// ---------------------------------------------------------------------------

/// 1999-12-31 12:00:00 UTC and 123456789 ns: a time no clock of the daemon
/// hands out, with nanoseconds that a stamp would not keep.
const BACKDATED_S: i64 = 946_641_600;
const BACKDATED_NS: i64 = 123_456_789;

/// One name of each class: a result (ccache 4.0–4.12), a manifest
/// (mutable), a ccache ≥ 4.13 entry whose header makes it mutable, an
/// ordinary file (mutable) and a host-local scratch file.
const NAMES_OF_EVERY_CLASS: [&str; 5] = [
    "a/0123456789abcdefghijklmnopqrR",
    "a/0123456789abcdefghijklmnopqrM",
    "1/2/0123456789abcdef0123456789abcdef",
    "notes.txt",
    "tmp/scratch",
];

fn mtime_of(p: &Path) -> (i64, i64) {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("stat {p:?}: {e}"));
    (m.mtime(), m.mtime_nsec())
}

#[test]
fn a_time_set_on_an_open_file_survives_its_close_and_publication_in_every_class() {
    let td = TestDir::new("opentimes");
    let (store, mp) = (td.store(), td.mountpoint("mnt"));
    let mut m = Mount::start(&store, &mp, &[]);
    for d in [
        "a", "1/2", "tmp", "cp/a", "cp/1/2", "cp/tmp", "late/a", "late/1/2", "late/tmp",
    ] {
        fs::create_dir_all(mp.join(d)).unwrap();
    }
    // `cp -a` of a backdated file: open(O_CREAT|O_EXCL), write, futimens,
    // fchown, fchmod, close.
    let src = td.path("backdated");
    fs::write(&src, b"made in 1999\n").unwrap();
    utimensat(&src, Some([timespec(BACKDATED_S, BACKDATED_NS); 2])).unwrap();
    for name in NAMES_OF_EVERY_CLASS {
        let out = Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(mp.join("cp").join(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cp -a to {name}: {}",
            output_text(&out)
        );
    }
    // The same through Python: futimens, and a time set by path while the
    // file is open (not for a result or a ccache >= 4.13 entry: their names
    // are bound at close); then a write after the time was set, which moves
    // the mtime to now again.
    let program = format!(
        r#"
import os
t = {BACKDATED_S} * 10**9 + {BACKDATED_NS}
for name in {names:?}:
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"written, then dated\n")
    if name.endswith("R") or name.startswith("1/2/"):
        os.utime(fd, ns=(t, t))
    else:
        os.utime(name, ns=(t, t))
    os.close(fd)
    fd = os.open("late/" + name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"dated, then written\n")
    os.utime(fd, ns=(t, t))
    os.write(fd, b"more\n")
    os.close(fd)
"#,
        names = NAMES_OF_EVERY_CLASS,
    );
    let before_ns = now_ns();
    python(&mp, &program);
    let check = |when: &str| {
        for name in NAMES_OF_EVERY_CLASS {
            for dir in ["cp/", ""] {
                let p = mp.join(format!("{dir}{name}"));
                assert_eq!(
                    mtime_of(&p),
                    (BACKDATED_S, BACKDATED_NS),
                    "{when}: mtime of {p:?}"
                );
            }
            let late = mp.join(format!("late/{name}"));
            assert!(
                mtime_ns(&late) >= before_ns,
                "{when}: a write after the time was set moves the mtime to now: {late:?}"
            );
        }
        assert_eq!(
            fs::read(mp.join("cp/a/0123456789abcdefghijklmnopqrR")).unwrap(),
            b"made in 1999\n"
        );
    };
    check("after close");
    // What the daemon recorded, not what the kernel cached.
    m.unmount();
    drop(m);
    let _m = Mount::start(&store, &mp, &[]);
    check("after remount");
}

// ---------------------------------------------------------------------------
// Permissions as Linux keeps them, for a user other than the owner
// ---------------------------------------------------------------------------

/// Helpers the permission programs below share: `t(what, f)` prints what
/// `f` returned (`ok` for None) or the errno's name; `mode(p)` the mode bits.
const PY_PRELUDE: &str = r#"
import errno, os
def t(what, f):
    try:
        r = f()
        print(what, "ok" if r is None else r)
    except OSError as e:
        print(what, errno.errorcode[e.errno])
def mode(p):
    return oct(os.stat(p).st_mode & 0o7777)
"#;

/// Runs `setup` (sh, as root), then `program` (Python after `PY_PRELUDE`,
/// as nobody:nogroup with no supplementary groups) in a new world-writable
/// directory `name` on the local disk and another in the mount; returns
/// what the program printed in each. The mount must allow other users.
fn here_and_on_local_disk(
    td: &TestDir,
    mp: &Path,
    name: &str,
    setup: &str,
    program: &str,
) -> (String, String) {
    use std::os::unix::fs::PermissionsExt;
    let (nobody, _) = user_ids("nobody");
    let nogroup = group_id("nogroup");
    let run = |dir: &Path| {
        fs::create_dir(dir).unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
        sh(dir, setup);
        let out = as_user(nobody, nogroup, &[])
            .args([
                "--",
                "timeout",
                &SCRIPT_TIMEOUT_S.to_string(),
                "python3",
                "-c",
            ])
            .arg(format!("{PY_PRELUDE}{program}"))
            // Python from the system (a per-user shim in root's home is
            // not for other users).
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir(dir)
            .output()
            .expect("run setpriv");
        assert!(
            out.status.success(),
            "as nobody in {dir:?}:\n{program}\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let local = run(&td.path(&format!("local-{name}")));
    let mounted = run(&mp.join(name));
    (mounted, local)
}

fn mounted_for_everyone(tag: &str) -> (TestDir, Mount) {
    use std::os::unix::fs::PermissionsExt;
    let td = TestDir::new(tag);
    let m = Mount::start(&td.store(), &td.mountpoint("mnt"), &["-o", "allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    (td, m)
}

#[test]
fn a_non_owner_cannot_chown_a_file_even_to_the_ids_it_already_has() {
    let (td, m) = mounted_for_everyone("chown-same");
    let (nobody, _) = user_ids("nobody");
    let nogroup = group_id("nogroup");
    let (mounted, local) = here_and_on_local_disk(
        &td,
        &m.mountpoint,
        "chown",
        "touch roots; chmod 644 roots",
        &format!(
            r#"
t("chown to its uid", lambda: os.chown("roots", 0, -1))
t("chgrp to its gid", lambda: os.chown("roots", -1, 0))
t("chown to both", lambda: os.chown("roots", 0, 0))
open("mine", "w").close()
t("chown own file to own ids", lambda: os.chown("mine", {nobody}, {nogroup}))
st = os.stat("roots")
print(st.st_uid, st.st_gid)
"#
        ),
    );
    assert_eq!(
        mounted,
        "chown to its uid EPERM\nchgrp to its gid EPERM\nchown to both EPERM\n\
         chown own file to own ids ok\n0 0\n"
    );
    assert_eq!(mounted, local, "as on the local disk");
}

#[test]
fn a_non_owners_write_or_truncate_clears_setuid_and_setgid_and_succeeds() {
    let (td, m) = mounted_for_everyone("killsuid");
    let (mounted, local) = here_and_on_local_disk(
        &td,
        &m.mountpoint,
        "killsuid",
        "for m in 4777 2777 6777; do
             printf old > w$m; printf old > t$m; chmod $m w$m t$m
         done",
        r#"
for m in ("4777", "2777", "6777"):
    fd = os.open("w" + m, os.O_WRONLY)
    t("write " + m, lambda: os.write(fd, b"new"))
    print("  mode", oct(os.fstat(fd).st_mode & 0o7777))
    os.close(fd)
    t("truncate " + m, lambda: os.truncate("t" + m, 1))
    print("  mode", mode("t" + m), "size", os.stat("t" + m).st_size)
"#,
    );
    assert_eq!(
        mounted,
        "write 4777 3\n  mode 0o777\ntruncate 4777 ok\n  mode 0o777 size 1\n\
         write 2777 3\n  mode 0o777\ntruncate 2777 ok\n  mode 0o777 size 1\n\
         write 6777 3\n  mode 0o777\ntruncate 6777 ok\n  mode 0o777 size 1\n"
    );
    assert_eq!(mounted, local, "as on the local disk");
    // The bytes arrived, and root (the owner) sees the bits gone.
    let dir = m.mountpoint.join("killsuid");
    for mode in ["4777", "2777", "6777"] {
        assert_eq!(fs::read(dir.join(format!("w{mode}"))).unwrap(), b"new");
        assert_eq!(
            fs::metadata(dir.join(format!("w{mode}"))).unwrap().mode() & 0o7777,
            0o777
        );
    }
}

#[test]
fn the_owner_setting_setgid_outside_the_files_group_loses_the_bit() {
    let (td, m) = mounted_for_everyone("sgid");
    let (nobody, _) = user_ids("nobody");
    let (mounted, local) = here_and_on_local_disk(
        &td,
        &m.mountpoint,
        "sgid",
        &format!("touch file; mkdir dir; chown {nobody}:0 file dir"),
        r#"
t("chmod 2755 file of group root", lambda: os.chmod("file", 0o2755))
print("  mode", mode("file"))
t("chmod 2755 directory of group root", lambda: os.chmod("dir", 0o2755))
print("  mode", mode("dir"))
open("mine", "w").close()
t("chmod 2755 file of own group", lambda: os.chmod("mine", 0o2755))
print("  mode", mode("mine"))
"#,
    );
    assert_eq!(
        mounted,
        "chmod 2755 file of group root ok\n  mode 0o755\n\
         chmod 2755 directory of group root ok\n  mode 0o755\n\
         chmod 2755 file of own group ok\n  mode 0o2755\n"
    );
    assert_eq!(mounted, local, "as on the local disk");
}

#[test]
fn ftruncate_through_a_descriptor_opened_for_writing_needs_no_write_permission() {
    let (td, m) = mounted_for_everyone("ftrunc0");
    let (mounted, local) = here_and_on_local_disk(
        &td,
        &m.mountpoint,
        "ftrunc",
        "true",
        r#"
fd = os.open("mode0", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0)
t("write", lambda: os.write(fd, b"hello"))
t("ftruncate", lambda: os.ftruncate(fd, 2))
print("  size", os.fstat(fd).st_size)
os.close(fd)
t("truncate by path", lambda: os.truncate("mode0", 1))
t("open for writing", lambda: os.close(os.open("mode0", os.O_WRONLY)))
print("  mode", mode("mode0"), "size", os.stat("mode0").st_size)
"#,
    );
    assert_eq!(
        mounted,
        "write 5\nftruncate ok\n  size 2\ntruncate by path EACCES\n\
         open for writing EACCES\n  mode 0o0 size 2\n"
    );
    assert_eq!(mounted, local, "as on the local disk");
}

#[test]
fn moving_a_directory_to_another_parent_needs_write_permission_on_it() {
    let (td, m) = mounted_for_everyone("mvdir");
    let (nobody, _) = user_ids("nobody");
    // pjdfstest rename/09: nobody owns the sticky directory, root owns the
    // directory in it. Moving it elsewhere changes its `..`; renaming it in
    // place does not.
    let (mounted, local) = here_and_on_local_disk(
        &td,
        &m.mountpoint,
        "mvdir",
        &format!(
            "mkdir -m 1777 sticky; mkdir sticky/roots; chown {nobody} sticky
             mkdir -m 0777 plain; mkdir plain/roots
             mkdir other; chown {nobody} other"
        ),
        r#"
for d in ("sticky", "plain"):
    t(d + ": move out", lambda: os.rename(d + "/roots", "other/roots"))
    os.mkdir("other/empty")
    t(d + ": move onto an empty directory", lambda: os.rename(d + "/roots", "other/empty"))
    os.rmdir("other/empty")
    t(d + ": rename in place", lambda: os.rename(d + "/roots", d + "/renamed"))
    print("  ", sorted(os.listdir(d)), sorted(os.listdir("other")))
os.mkdir("other/mine")
t("own directory moves", lambda: os.rename("other/mine", "plain/mine"))
"#,
    );
    assert_eq!(
        mounted,
        "sticky: move out EACCES\nsticky: move onto an empty directory EACCES\n\
         sticky: rename in place ok\n   ['renamed'] []\n\
         plain: move out EACCES\nplain: move onto an empty directory EACCES\n\
         plain: rename in place ok\n   ['renamed'] []\n\
         own directory moves ok\n"
    );
    assert_eq!(mounted, local, "as on the local disk");
}
