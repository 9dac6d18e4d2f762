//! The daemon as an operator's tools see it: sizes written as ccache writes
//! them, readiness and status reported to a service manager
//! (`$NOTIFY_SOCKET`) and to a parent (`--ready-fd`), log lines shaped for
//! the journal, and the Prometheus metrics a scraper reads.
//!
//! Every test mounts for real; each daemon is stopped and each mount
//! cleared by the guards of `tests/common`, also when a test fails.

mod common;

use common::*;

/// `casfs mount` with `args` is refused before it mounts, and says why,
/// naming what was given and showing an accepted example.
fn refused_size(td: &TestDir, args: &[&str], given: &str) {
    let mp = td.mountpoint("refused");
    let log = expect_mount_refused(&td.store(), &mp, args, "a size that is not one");
    assert!(
        log.contains(&format!("{given:?} is refused")) && log.contains("20Gi = 20 GiB"),
        "casfs mount {args:?} must name {given:?} and show how sizes are written:\n{log}"
    );
    assert!(!is_mounted(&mp), "{mp:?} was mounted by a refused daemon");
}

#[test]
fn max_size_is_read_as_ccache_reads_it_and_anything_else_is_refused() {
    let td = TestDir::new("sizes");
    let mp = td.mountpoint("mnt");
    // A bare number is G, as in ccache.conf's `max_size = 20`.
    for (args, expect) in [
        (
            &["--max-size", "20"][..],
            "size limit: 20G (20000000000 bytes)",
        ),
        (
            &["-o", "max_size=20Gi"][..],
            "size limit: 20Gi (21474836480 bytes)",
        ),
        (
            &["-o", "max_size=500M"][..],
            "size limit: 500M (500000000 bytes)",
        ),
        // The flag wins over the option.
        (
            &["-o", "max_size=1T", "--max-size", "64Ki"][..],
            "size limit: 64Ki (65536 bytes)",
        ),
    ] {
        let mut m = Mount::start(&td.store(), &mp, args);
        let log = m.log();
        assert!(
            log.contains(expect),
            "casfs mount {args:?} must log {expect:?}:\n{log}"
        );
        m.unmount();
    }
    // 0 is ccache's "no limit".
    let mut m = Mount::start(&td.store(), &mp, &["--max-size", "0"]);
    assert!(
        !m.log().contains("size limit:"),
        "--max-size 0 must mean no limit:\n{}",
        m.log()
    );
    m.unmount();

    for (args, given) in [
        (&["--max-size", "inf"][..], "inf"),
        (&["--max-size", "1e30"][..], "1e30"),
        (&["--max-size=-1"][..], "-1"),
        (&["--max-size", "20g"][..], "20g"),
        (&["--max-size", "lots"][..], "lots"),
        (&["-o", "max_size=0.0000000001"][..], "0.0000000001"),
        (&["-o", "allow_other,max_size=20Gx"][..], "20Gx"),
    ] {
        refused_size(&td, args, given);
    }
}

// ---------------------------------------------------------------------------
// Readiness: $NOTIFY_SOCKET and --ready-fd
// ---------------------------------------------------------------------------

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// The next notification on `socket`; fails after `READY_TIMEOUT_S`.
fn next_notification(socket: &UnixDatagram, m: &Mount, waiting_for: &str) -> String {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no notification ({e}) while waiting for {waiting_for}; the daemon's output:\n{}",
            m.log()
        ),
    }
}

/// Notifications until one contains `want`; returns them all.
fn notifications_until(socket: &UnixDatagram, m: &Mount, want: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let n = next_notification(socket, m, want);
        let done = n.lines().any(|l| l == want);
        got.push(n);
        if done {
            return got;
        }
        assert!(got.len() < 100, "no {want} in {got:?}");
    }
}

/// A mount is there and serves: the kernel shows casfs on `mp`, and its
/// statistics file answers.
fn assert_serving(mp: &Path, when: &str) {
    let m = top_mount(mp).unwrap_or_else(|| panic!("{when}: nothing is mounted on {mp:?}"));
    assert!(
        m.fstype == "fuse.casfs" || m.source.starts_with("casfs:"),
        "{when}: the mount on {mp:?} is not casfs: {m:?}"
    );
    assert!(
        fs::read_to_string(mp.join(".casfs/stats")).is_ok_and(|t| t.starts_with("casfs")),
        "{when}: {mp:?} is mounted but .casfs/stats does not answer"
    );
}

/// Plays the service manager on `address` (a path, or `@name` for the
/// abstract namespace) for one daemon's life.
fn notify_socket_sees_ready_then_stopping(td: &TestDir, socket: UnixDatagram, address: &str) {
    socket
        .set_read_timeout(Some(Duration::from_secs(READY_TIMEOUT_S)))
        .unwrap();
    let mp = td.mountpoint(&format!("mnt-{}", address.len()));
    let mut m = Mount::spawn_with(&td.store(), &mp, &[], |c, _| {
        c.env("NOTIFY_SOCKET", address);
    });
    let before = notifications_until(&socket, &m, "READY=1");
    // READY=1 comes once the mount serves, never before.
    assert_serving(&mp, "at READY=1");
    let ready = before.last().unwrap();
    assert!(
        ready.contains(&format!("STATUS=serving {}", mp.display()))
            && ready.contains("no shared tier"),
        "READY=1 must come with a STATUS= saying what is served: {ready:?}"
    );
    assert!(
        before[..before.len() - 1]
            .iter()
            .all(|n| !n.contains("READY=1") && n.starts_with("STATUS=")),
        "only STATUS= lines may come before READY=1: {before:?}"
    );
    m.unmount();
    let after = notifications_until(&socket, &m, "STOPPING=1");
    assert!(
        after.iter().all(|n| !n.contains("READY=1")),
        "READY=1 was sent twice: {after:?}"
    );
    let last = next_notification(&socket, &m, "the final STATUS=");
    assert_eq!(
        last,
        format!("STATUS=unmounted {}", mp.display()),
        "after STOPPING=1 the status says the mount is gone"
    );
}

#[test]
fn notify_socket_gets_ready_once_the_mount_serves_and_stopping_at_unmount() {
    let td = TestDir::new("notify");
    // A path, as systemd gives it (/run/systemd/notify) ...
    let path = td.path("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    notify_socket_sees_ready_then_stopping(&td, socket, path.to_str().unwrap());
    // ... and an abstract address (`@name`), as other supervisors do.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("casfs-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    notify_socket_sees_ready_then_stopping(&td, socket, &format!("@{name}"));
}

/// A pipe whose write end a daemon gets as descriptor 3; the read end
/// yields everything written until the daemon closes it (or exits).
struct ReadyPipe {
    lines: mpsc::Receiver<String>,
    writer: Option<OwnedFd>,
}

impl ReadyPipe {
    fn new() -> ReadyPipe {
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) into a local array; both ends close on exec, the
        // child gets its copy by dup2 below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and owned here.
        let (mut reader, writer) =
            unsafe { (fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = reader.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        ReadyPipe {
            lines,
            writer: Some(writer),
        }
    }

    /// Makes the write end descriptor 3 of `cmd`'s process.
    fn give(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let fd = self.writer.as_ref().unwrap().as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; it runs in the child between
        // fork and exec, and leaves descriptor 3 without close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Everything the daemon wrote before it closed the descriptor.
    fn text(&mut self, m: &Mount) -> String {
        self.writer = None;
        self.lines
            .recv_timeout(Duration::from_secs(READY_TIMEOUT_S))
            .unwrap_or_else(|_| {
                panic!(
                    "the daemon neither wrote its ready line nor closed the descriptor within \
                     {READY_TIMEOUT_S} s; its output:\n{}",
                    m.log()
                )
            })
    }
}

#[test]
fn ready_fd_says_ready_once_the_mount_serves_or_carries_the_daemons_error() {
    let td = TestDir::new("ready-fd");
    let mp = td.mountpoint("mnt");
    let mut pipe = ReadyPipe::new();
    let mut m = Mount::spawn_with(&td.store(), &mp, &["--ready-fd", "3"], |c, _| pipe.give(c));
    // One line, then EOF: the daemon closed it and goes on serving.
    assert_eq!(
        pipe.text(&m),
        "ready\n",
        "the daemon's output:\n{}",
        m.log()
    );
    assert!(
        m.try_status().is_none(),
        "the daemon exited after saying ready"
    );
    assert_serving(&mp, "when the ready line arrived");

    // A second daemon on the same (busy) mountpoint says why it gives up,
    // in the same words as on its stderr.
    let mut pipe2 = ReadyPipe::new();
    let mut refused = Mount::spawn_with(&td.dir("store-2"), &mp, &["--ready-fd", "3"], |c, _| {
        pipe2.give(c)
    });
    let line = pipe2.text(&refused);
    let st = refused.wait_exit(EXIT_TIMEOUT_S);
    assert!(!st.success(), "a daemon on a busy mountpoint exited 0");
    assert!(
        line.starts_with("casfs: ")
            && line.contains("already a mountpoint")
            && line.ends_with('\n')
            && line.lines().count() == 1,
        "the ready descriptor must carry the daemon's one-line error: {line:?}"
    );
    assert!(
        refused.log().contains(line.trim_end()),
        "the line on the descriptor must be the daemon's own stderr message:\n{}",
        refused.log()
    );
    drop(refused);
    assert_serving(&mp, "after a second daemon was refused");
    m.unmount();

    // An unknown option is refused the same way.
    let mut pipe3 = ReadyPipe::new();
    let mut bad = Mount::spawn_with(
        &td.store(),
        &mp,
        &["--ready-fd", "3", "-o", "frobnicate"],
        |c, _| pipe3.give(c),
    );
    let line = pipe3.text(&bad);
    assert!(!bad.wait_exit(EXIT_TIMEOUT_S).success());
    assert!(
        line.starts_with("casfs: unknown mount option \"frobnicate\""),
        "{line:?}"
    );
    // A descriptor that is not open is refused before anything is mounted.
    let log = expect_mount_refused(
        &td.store(),
        &mp,
        &["--ready-fd", "9"],
        "a closed --ready-fd",
    );
    assert!(
        log.contains("--ready-fd 9: descriptor 9 is not open"),
        "{log}"
    );
    assert!(!is_mounted(&mp));
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

#[test]
fn on_the_journal_log_lines_carry_a_priority_and_no_timestamp_of_their_own() {
    use std::os::unix::fs::MetadataExt;
    let td = TestDir::new("journal");
    let mp = td.mountpoint("mnt");
    // stderr is the stream JOURNAL_STREAM names (device:inode), as under
    // systemd: the journal stamps lines itself.
    let mut m = Mount::spawn_with(&td.store(), &mp, &[], |c, log| {
        let meta = fs::metadata(log).unwrap();
        c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    });
    m.wait_ready();
    m.unmount();
    let log = m.log();
    let mounted = log
        .lines()
        .find(|l| l.contains("mounted store="))
        .unwrap_or_else(|| panic!("no `mounted` line:\n{log}"));
    assert!(
        mounted.starts_with("<6>[INFO casfs::daemon] mounted store="),
        "on the journal a line is `<priority>[LEVEL target] message`: {mounted:?}"
    );
    assert!(
        log.lines().all(|l| l.starts_with('<')),
        "every line carries a priority and no timestamp:\n{log}"
    );
    // The variable inherited by a process whose stderr goes elsewhere is
    // not the journal: timestamps stay.
    let mut m = Mount::spawn_with(&td.store(), &mp, &[], |c, _| {
        c.env("JOURNAL_STREAM", "1:2");
    });
    m.wait_ready();
    m.unmount();
    let log = m.log();
    let mounted = log.lines().find(|l| l.contains("mounted store=")).unwrap();
    assert!(
        mounted.starts_with("[20") && mounted.contains("Z INFO "),
        "off the journal a line starts with its timestamp: {mounted:?}"
    );
}

// ---------------------------------------------------------------------------
// Metrics, scraped by node_exporter through the textfile recipe
// ---------------------------------------------------------------------------

/// A `prometheus-node-exporter` serving only its textfile collector on a
/// free loopback port; killed on drop.
struct NodeExporter {
    child: std::process::Child,
    port: u16,
}

impl NodeExporter {
    fn start(textfile_dir: &Path) -> NodeExporter {
        let bin = find_program("prometheus-node-exporter").unwrap_or_else(|| {
            panic!(
                "prometheus-node-exporter is not installed (apt-get install \
                 prometheus-node-exporter); this test never skips"
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!(
                "--collector.textfile.directory={}",
                textfile_dir.display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus-node-exporter");
        NodeExporter { child, port }
    }

    /// The body of GET /metrics, once the exporter answers (at most 10 s).
    fn metrics(&mut self) -> String {
        use std::io::Write;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    .unwrap();
                let mut text = String::new();
                s.read_to_string(&mut text).unwrap();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    assert!(
                        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
                        "{head}"
                    );
                    return body.to_string();
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("prometheus-node-exporter exited ({st})");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "prometheus-node-exporter does not answer on port {}",
                self.port
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `casfs-textfile ARGS...`; returns (exit code, stderr).
fn casfs_textfile(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = Command::new(helpers_dir().join("casfs-textfile"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run mount-helpers/casfs-textfile");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn node_exporter_scrapes_two_mounts_at_once_through_the_textfile_recipe() {
    let td = TestDir::new("node-exporter");
    let (mp1, mp2) = (td.mountpoint("cc one"), td.mountpoint("cc2"));
    let m1 = Mount::start(&td.dir("store1"), &mp1, &[]);
    let m2 = Mount::start(&td.dir("store2"), &mp2, &[]);
    let d = mp1.join("a");
    fs::create_dir_all(&d).unwrap();
    publish(
        &d,
        "t.tmp",
        "0123456789abcdef0123456789abcdR",
        b"one result",
    );
    assert_eq!(
        fs::read(d.join("0123456789abcdef0123456789abcdR")).unwrap(),
        b"one result"
    );
    let textdir = td.dir("textfile");
    // A stale file of a mount that is gone is removed by a full run.
    fs::write(
        textdir.join("casfs-gone.prom"),
        "casfs_blobs{mount=\"/gone\"} 1\n",
    )
    .unwrap();

    let name = |mp: &Path| {
        let out = Command::new("systemd-escape")
            .arg("--path")
            .arg(mp)
            .output()
            .expect("systemd-escape");
        format!("casfs-{}.prom", String::from_utf8_lossy(&out.stdout).trim())
    };
    // Every casfs mount of the host (other tests' too: their exit status is
    // theirs), then these two by name.
    let (_, err) = casfs_textfile(&[
        "--dir".as_ref(),
        textdir.as_os_str(),
        "--timeout".as_ref(),
        "5".as_ref(),
    ]);
    for mp in [&mp1, &mp2] {
        assert!(
            textdir.join(name(mp)).exists(),
            "casfs-textfile over every mount did not write {mp:?}: {err}"
        );
    }
    assert!(
        !textdir.join("casfs-gone.prom").exists(),
        "the file of a mount that is gone is still exported"
    );
    let (code, err) = casfs_textfile(&[
        "--dir".as_ref(),
        textdir.as_os_str(),
        mp1.as_os_str(),
        mp2.as_os_str(),
    ]);
    assert_eq!(code, 0, "casfs-textfile over two mounts failed: {err}");
    for mp in [&mp1, &mp2] {
        let f = textdir.join(name(mp));
        let text = fs::read_to_string(&f).unwrap_or_else(|e| panic!("{f:?}: {e}"));
        assert!(text.ends_with(&format!(
            "casfs_textfile_success{{mount=\"{}\"}} 1\n",
            mp.display()
        )));
    }
    // No temporary file is left beside them.
    assert!(
        fs::read_dir(&textdir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "casfs-textfile left a temporary file"
    );

    let mut exporter = NodeExporter::start(&textdir);
    let body = exporter.metrics();
    assert!(
        body.lines().any(|l| l == "node_textfile_scrape_error 0"),
        "node_exporter refused the files: {}",
        body.lines()
            .filter(|l| l.starts_with("node_textfile") || l.contains("error"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (mp, blobs) in [(&mp1, 1), (&mp2, 0)] {
        let want = format!("casfs_blobs{{mount=\"{}\"}} {blobs}", mp.display());
        assert!(
            body.lines().any(|l| l == want),
            "node_exporter's /metrics lacks {want:?}:\n{}",
            body.lines()
                .filter(|l| l.starts_with("casfs_blobs"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let lookups = format!(
            "casfs_fuse_request_seconds_count{{mount=\"{}\",op=\"lookup\"}}",
            mp.display()
        );
        assert!(body.contains(&lookups), "no {lookups} in /metrics");
    }

    // A hung mount: its read is abandoned after the timeout, and its file
    // says so instead of passing old numbers for new.
    m2.signal(libc::SIGSTOP);
    let t0 = std::time::Instant::now();
    let (code, err) = casfs_textfile(&[
        "--dir".as_ref(),
        textdir.as_os_str(),
        "--timeout".as_ref(),
        "1".as_ref(),
        mp1.as_os_str(),
        mp2.as_os_str(),
    ]);
    let took = t0.elapsed();
    m2.signal(libc::SIGCONT);
    assert_eq!(
        code, 1,
        "a hung mount must make casfs-textfile exit 1: {err}"
    );
    assert!(err.contains("did not answer within 1 s"), "{err}");
    assert!(
        took < Duration::from_secs(20),
        "casfs-textfile took {took:?} with a 1 s timeout"
    );
    assert_eq!(
        fs::read_to_string(textdir.join(name(&mp2)))
            .unwrap()
            .lines()
            .last(),
        Some(format!("casfs_textfile_success{{mount=\"{}\"}} 0", mp2.display()).as_str())
    );
    let body = exporter.metrics();
    assert!(body.lines().any(|l| l == "node_textfile_scrape_error 0"));
    assert!(body.contains(&format!("casfs_blobs{{mount=\"{}\"}} 1", mp1.display())));
    drop(exporter);
    let (mut m1, mut m2) = (m1, m2);
    m1.unmount();
    m2.unmount();
}

// ---------------------------------------------------------------------------
// Unmount while another mount namespace holds a copy
// ---------------------------------------------------------------------------

/// A process in a mount namespace of its own; killed on drop.
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn casfs_unmount_names_the_other_mount_namespaces_that_keep_the_daemon_serving() {
    require_programs(&[("unshare", "util-linux")]);
    let td = TestDir::new("unmount-holders");
    let mp = td.mountpoint("mnt");
    let mut m = Mount::start(&td.store(), &mp, &[]);
    // A copy of the mount table with the mount in it, as a container or
    // `unshare -m` makes.
    let mut holder = Holder(
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sleep", "120"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("unshare -m sleep"),
    );
    let pid = holder.0.id();
    let ours = fs::read_link("/proc/self/ns/mnt").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().as_ref() == Some(&ours)
        || !fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap_or_default()
            .contains(mp.to_str().unwrap())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "unshare -m did not start"
        );
        thread::sleep(Duration::from_millis(20));
    }

    let out = casfs(&["unmount".as_ref(), mp.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        err.contains("1 other mount namespace(s) still hold the mount")
            && err.contains(&format!("{pid} (sleep)"))
            && err.contains("its daemon keeps serving them"),
        "casfs unmount must name the namespaces that keep the daemon serving:\n{err}"
    );
    assert!(!is_mounted(&mp), "{mp:?} is still mounted here");
    thread::sleep(Duration::from_millis(300));
    assert!(
        m.try_status().is_none(),
        "the daemon exited although another namespace still holds its mount"
    );
    // The last copy goes: the daemon exits 0.
    let _ = holder.0.kill();
    let _ = holder.0.wait();
    let st = m.wait_exit(EXIT_TIMEOUT_S);
    assert!(st.success(), "daemon exit after the last copy went: {st}");
    drop(holder);
}
