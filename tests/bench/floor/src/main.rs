//! A minimal fuser filesystem: a root directory holding one regular file
//! `f`. `lookup` gives a long entry TTL and an attribute TTL of 0, `getattr`
//! an attribute TTL of 0, so every stat() of `f` costs exactly one GETATTR
//! round trip; `open`, `flush`, `release` reply at once (a read-only `open`
//! with FOPEN_NOFLUSH, as casfs does, so open+close is OPEN + RELEASE) and
//! `setattr` replies with the attributes. Nothing else is implemented.
//!
//! Usage: casfs-bench-floor MOUNTPOINT [THREADS=1] [clone_fd|no] [dev|uring]
//! Runs in the foreground until unmounted (umount MOUNTPOINT). `uring`
//! serves FUSE over io_uring through casfs's own transport
//! (src/fuse/uring.rs, THREADS per queue, each queue's threads on its CPU)
//! and fails if the kernel does not offer it; `dev` (the default) reads
//! `/dev/fuse` as fuser does.
// casfs's own transport; the floor uses only part of it.
#[allow(dead_code)]
#[path = "../../../../src/fuse/uring.rs"]
mod uring;

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr,
    ReplyEmpty, ReplyEntry, ReplyOpen, Request, Session, TimeOrNow,
};

const ENTRY_TTL: Duration = Duration::from_secs(86400);
const ATTR_TTL: Duration = Duration::ZERO;

struct Floor {
    dir: FileAttr,
    file: FileAttr,
    /// Asks for FUSE over io_uring at INIT.
    want_ring: bool,
    /// The kernel agreed to it.
    ring: Arc<AtomicBool>,
}

fn attr(ino: u64, kind: FileType, perm: u16, size: u64) -> FileAttr {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl Floor {
    fn get(&self, ino: INodeNo) -> Option<&FileAttr> {
        match u64::from(ino) {
            1 => Some(&self.dir),
            2 => Some(&self.file),
            _ => None,
        }
    }
}

impl Filesystem for Floor {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if self.want_ring {
            let ok = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            self.ring.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) == 1 && name == "f" {
            reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &self.file, Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.get(ino) {
            Some(a) => reply.attr(&ATTR_TTL, a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.get(ino) {
            Some(a) => reply.attr(&ATTR_TTL, a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Like casfs: a read-only handle has nothing to do at close, so the
        // kernel is told to skip FLUSH (open+close = OPEN + RELEASE).
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY && flags.0 & libc::O_TRUNC == 0;
        let f = if read_only {
            FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(0), f);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(mountpoint) = args.get(1) else {
        eprintln!("usage: casfs-bench-floor MOUNTPOINT [THREADS=1] [clone_fd|no] [dev|uring]");
        std::process::exit(2);
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("casfs-bench-floor".into()),
        MountOption::Subtype("floor".into()),
    ];
    if let Some(n) = args.get(2) {
        config.n_threads = Some(n.parse().expect("THREADS is a number"));
    }
    config.clone_fd = args.get(3).is_some_and(|a| a == "clone_fd");
    let want_ring = match args.get(4).map(String::as_str) {
        None | Some("dev") => false,
        Some("uring") => true,
        Some(other) => {
            eprintln!("floor: unknown transport {other:?} (dev or uring)");
            std::process::exit(2);
        }
    };
    if want_ring {
        if let Err(e) = uring::kernel_offers() {
            eprintln!("floor: {e}");
            std::process::exit(1);
        }
    }
    let ring = Arc::new(AtomicBool::new(false));
    let fs = Floor {
        dir: attr(1, FileType::Directory, 0o755, 0),
        file: attr(2, FileType::RegularFile, 0o644, 0),
        want_ring,
        ring: ring.clone(),
    };
    eprintln!(
        "floor: {mountpoint}, {} thread(s), clone_fd {}, transport {}",
        config.n_threads.unwrap_or(1),
        config.clone_fd,
        if want_ring { "uring" } else { "dev" }
    );
    let session = Session::new(fs, mountpoint, &config).unwrap_or_else(|e| {
        eprintln!("floor: cannot mount {mountpoint}: {e}");
        std::process::exit(1);
    });
    let result = if want_ring {
        if !ring.load(Ordering::Relaxed) {
            eprintln!("floor: the kernel did not agree to FUSE over io_uring at INIT");
            drop(session);
            std::process::exit(1);
        }
        let ring_config = uring::RingConfig {
            threads_per_queue: config.n_threads.unwrap_or(1),
            pin: true,
            mountpoint: mountpoint.into(),
        };
        uring::run(session.into_dispatcher(), &ring_config)
    } else {
        session.run()
    };
    if let Err(e) = result {
        eprintln!("floor: {e}");
        std::process::exit(1);
    }
}
