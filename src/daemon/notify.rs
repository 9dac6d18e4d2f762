//! Readiness and status, told by the daemon itself to whoever started it,
//! instead of being guessed by polling the mount or scraping the log:
//!
//! - a service manager, through `$NOTIFY_SOCKET` (systemd's `sd_notify`
//!   protocol: one datagram of newline-separated `KEY=VALUE` lines on a
//!   unix datagram socket, at a path or, when the address starts with `@`,
//!   in the abstract namespace). The daemon sends `READY=1` once the mount
//!   serves, `STATUS=` lines with what it is doing and how many uploads are
//!   pending, and `STOPPING=1` when it starts to unmount. Whenever the
//!   variable is set, with or without systemd (any supervisor that speaks
//!   the protocol works).
//! - a parent process, through `--ready-fd N`: the daemon writes exactly one
//!   line to descriptor N, `ready` or its own error message (`casfs: ...`,
//!   the same text as on stderr), and closes it. A parent that reads EOF
//!   without a line knows the daemon died before it could say anything.
//!
//! Invariants: the ready line is written at most once (the descriptor is
//! taken out of its slot to write it), and only after the mount is
//! visible in `/proc/self/mountinfo` and the kernel's `INIT` was answered
//! (fuser's `Session::new` does both before it returns), so whoever reads
//! `ready` can use the mount at once. Nothing here ever blocks the daemon:
//! the socket is non-blocking and a failed send is logged once and dropped;
//! the ready descriptor is written once, with a line far below a pipe's
//! capacity.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use log::warn;

/// What the daemon says to its starters. One per daemon.
pub struct Readiness {
    /// The `$NOTIFY_SOCKET` socket and its address, if the variable is set.
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// `--ready-fd`, until its one line is written.
    ready_fd: Mutex<Option<File>>,
    /// Whether a send to the socket failed already (logged once).
    send_failed: AtomicBool,
    stopping: AtomicBool,
}

impl Readiness {
    /// Nobody to tell: for tests and tools.
    pub fn none() -> Readiness {
        Readiness {
            socket: None,
            ready_fd: Mutex::new(None),
            send_failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    /// From `$NOTIFY_SOCKET` and `--ready-fd`. The descriptor is checked
    /// and taken over (close-on-exec, closed once its line is written).
    pub fn new(notify_socket: Option<&str>, ready_fd: Option<i32>) -> Result<Readiness, String> {
        let mut r = Readiness::none();
        if let Some(fd) = ready_fd {
            r.ready_fd = Mutex::new(Some(take_fd(fd)?));
        }
        if let Some(address) = notify_socket.filter(|a| !a.is_empty()) {
            match open_socket(address) {
                Ok(s) => r.socket = Some(s),
                // A bad address must not stop the mount: the supervisor
                // then times out, with this line in the log to say why.
                Err(e) => warn!("NOTIFY_SOCKET={address:?}: {e}; readiness is not reported there"),
            }
        }
        Ok(r)
    }

    /// Whether a service manager listens (`$NOTIFY_SOCKET`).
    pub fn has_socket(&self) -> bool {
        self.socket.is_some()
    }

    /// The mount serves: `READY=1` with `status`, and `ready` on the fd.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
        self.write_line("ready");
    }

    /// The daemon could not start: its error message on the fd, and as the
    /// service's status.
    pub fn failed(&self, message: &str) {
        self.send(&format!("STATUS={}", one_line(message)));
        self.write_line(message);
    }

    /// What the daemon is doing (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// The daemon starts to unmount: `STOPPING=1`, once.
    pub fn stopping(&self, status: &str) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
        }
    }

    fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.socket else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            if !self.send_failed.swap(true, Ordering::Relaxed) {
                warn!("cannot notify the service manager ({message:?}): {e}");
            }
        }
    }

    fn write_line(&self, line: &str) {
        let Some(mut f) = self
            .ready_fd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        // EPIPE: the parent stopped listening, which is its business.
        let _ = f.write_all(format!("{}\n", one_line(line)).as_bytes());
    }
}

/// `text` as one line (the protocols are line based).
fn one_line(text: &str) -> String {
    text.trim_end().replace('\n', " ")
}

/// Takes over descriptor `fd` for the ready line.
fn take_fd(fd: i32) -> Result<File, String> {
    if fd <= 2 {
        return Err(format!(
            "--ready-fd {fd}: use a descriptor above 2 (stdin, stdout and stderr stay what they are), e.g. `casfs mount --ready-fd 3 ... 3>PIPE`"
        ));
    }
    // SAFETY: fcntl on a descriptor number only queries or sets its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(format!(
            "--ready-fd {fd}: descriptor {fd} is not open ({}); start casfs with it open for writing, e.g. `casfs mount --ready-fd {fd} ... {fd}>PIPE`",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: as above. Close-on-exec: helpers the daemon runs
    // (fusermount3) must not hold the parent's pipe open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open, and from here on only this File owns
    // it (the command line gave it to the daemon for this purpose).
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A socket to send to `address` (`/path` or `@abstract`).
fn open_socket(address: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = if let Some(name) = address.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else if address.starts_with('/') {
        SocketAddr::from_pathname(address)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "only unix socket addresses (/path or @abstract) are supported",
        ));
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = s.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("casfs-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let r = Readiness::new(path.to_str(), None).unwrap();
        r.ready("serving /x");
        assert_eq!(recv(&listener), "READY=1\nSTATUS=serving /x");
        r.stopping("unmounting\n/x");
        assert_eq!(recv(&listener), "STOPPING=1\nSTATUS=unmounting /x");
        r.stopping("again");
        r.status("after");
        assert_eq!(recv(&listener), "STATUS=after", "STOPPING=1 is sent once");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("casfs-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        abstract_listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let r = Readiness::new(Some(&format!("@{name}")), None).unwrap();
        r.ready("ok");
        assert_eq!(recv(&abstract_listener), "READY=1\nSTATUS=ok");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ready_fd_gets_one_line_and_is_closed() {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the read end is ours.
        let mut reader = unsafe { File::from_raw_fd(fds[0]) };
        let r = Readiness::new(None, Some(fds[1])).unwrap();
        r.failed("casfs: mountpoint /x is busy\n(details)");
        r.ready("ignored: the line was written");
        drop(r);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "casfs: mountpoint /x is busy (details)\n");

        let e = Readiness::new(None, Some(2)).err().unwrap();
        assert!(e.contains("above 2"), "{e}");
        let e = Readiness::new(None, Some(987_654)).err().unwrap();
        assert!(e.contains("987654 is not open"), "{e}");
    }
}
