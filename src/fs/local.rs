//! Host-local files (class `local`: ccache's `stats` counters, `symlink()`
//! locks and `.alive` files, `tmp/`, `ccache.conf`, `CACHEDIR.TAG`, the
//! 2.x/3.x temporaries) as plain files in a tree on the store's filesystem:
//! `local/<directory ino>/<name>`. The tree is their namespace: each
//! operation on such a name is the one syscall a local disk would do there
//! (`openat`, `renameat2`, `unlinkat`, `symlinkat`, `linkat`, `fchmodat`,
//! `utimensat`, `truncate`), attributes are the file's own (`fstatat`), and
//! nothing about them is written to RocksDB. Directories stay in RocksDB.
//!
//! Inode numbers: `Ino::LOCAL_BIT` plus a counter, handed out per mount the
//! first time a tree file is seen (by its ext4 inode number, so hard links
//! and renames keep one number), and kept while its file has a name this
//! mount knows or the kernel or a handle holds it (`Maps`). The kernel's
//! references never outlive a mount, so the numbers need no persistence.
//!
//! Invariants:
//! - A name is bound in the tree or in RocksDB, never both: a local-class
//!   name is created in the tree only if RocksDB has no entry of that name,
//!   and every creating call in RocksDB checks the tree first (`local_has`).
//!   Local-class names in RocksDB (stores from before the tree; a shared
//!   file renamed or linked onto a local-class name) keep working there.
//! - A tree file that gets a shared name (a rename or link of ccache's
//!   temporary onto a result or manifest, or onto any name RocksDB holds) is
//!   first *imported*: moved (one `renameat`, or copied when a writer holds
//!   it or it has other names) to `staging/<new ino>` and recorded as a
//!   staged RocksDB inode under its tree name; then the ordinary rename or
//!   link publishes it, with every create-only rule. While the kernel holds
//!   the tree file's inode, that inode stands for the imported one: calls
//!   on it go to the imported inode (`Node::forward`), and every reply that
//!   names the imported inode names the tree file's number instead
//!   (`Maps::shown_as`, `Core::shown`), so each name the kernel learns
//!   during that time agrees with the names it already has (`stat` and
//!   `test -ef` see one inode). Kernel references taken meanwhile are
//!   counted on both; once the kernel forgets the old number, replies name
//!   the imported inode.
//! - Only tree files live in the tree: no directories, so a directory's
//!   tree is a flat `local/<ino>/`, made at the first local name in it and
//!   removed with the directory (`rmdir` holds the directory's stripe
//!   exclusively; tree changes hold the stripes of their directories).
//!
//! What survives: the tree is ordinary ext4 files, so a `kill -9` of the
//! daemon loses nothing (the page cache holds what was written) and a
//! remount finds every name, counter and configuration file; a power loss
//! keeps what ext4 keeps of files nobody fsyncs (ccache's counters may go
//! back a few updates, as on a local disk). Nothing else is promised for
//! scratch: a temporary being imported when the daemon dies may be lost.
//!
//! Times: ext4 stamps writes (the kernel's clock); a touch to now
//! (`utimensat(UTIME_NOW)`, ccache's `.alive` files) takes the daemon's
//! clock, so it is never behind wall time; explicit times are kept. When a
//! file is imported, an mtime unlike its ctime was set by a client and the
//! publication keeps it; otherwise the publication stamps the clock's now.
//! A directory's mtime and ctime are the later of its record's and its
//! tree folder's.
//!
//! Lock order: `Maps` is a leaf (level 4), held for one map operation with
//! no syscall under it.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use log::{debug, info, warn};

use crate::classes::Class;
use crate::error::{enoent, Error, Result};
use crate::fs::{Attr, Caller, Core, DirEntry, SetAttr, SetTime};
use crate::store::ids::Ino;
use crate::store::meta::{Content, Inode, Kind};

/// The tree's folder below the store root.
pub const LOCAL_DIR: &str = "local";

/// One tree file the kernel may know.
struct Node {
    /// Its names this mount knows (hard links: several).
    names: Vec<(Ino, Vec<u8>)>,
    /// Its ext4 inode number.
    file: u64,
    /// Imported into RocksDB as this inode (see the module doc).
    forward: Option<Ino>,
    /// Kernel references (lookups not yet forgotten).
    lookups: u64,
    /// Open handles.
    handles: u64,
}

#[derive(Default)]
struct Maps {
    by_ino: HashMap<Ino, Node>,
    by_file: HashMap<u64, Ino>,
    /// Imported inodes shown to the kernel under the tree file's number
    /// it still holds (see the module doc).
    shown_as: HashMap<Ino, Ino>,
}

impl Maps {
    /// Drops `ino` once nothing can reach it: no name and no reference.
    fn prune(&mut self, ino: Ino) {
        if let Some(n) = self.by_ino.get(&ino) {
            if n.names.is_empty() {
                if self.by_file.get(&n.file) == Some(&ino) {
                    let file = n.file;
                    self.by_file.remove(&file);
                }
                if n.lookups == 0 && n.handles == 0 {
                    if let Some(r) = n.forward {
                        self.shown_as.remove(&r);
                    }
                    self.by_ino.remove(&ino);
                }
            }
        }
    }

    /// Before a syscall that may remove the last link of the file at
    /// `name` in `dir`: forgets which number its ext4 inode has, so that a
    /// file ext4 makes in that inode once it is freed (the kernel reuses
    /// inode numbers at once) gets a number of its own, never this one.
    /// Without it, a file created elsewhere between the syscall and
    /// `unname` would be bound to the old number, which the kernel still
    /// holds for other names (a renamed temporary's result name), and would
    /// serve its bytes under them. The kernel keeps lookups of `name` out
    /// meanwhile (it holds the directory's lock across an unlink or
    /// rename); a file with more links than this mount knows of may get a
    /// second number for a later-seen name, which is harmless. Returns what
    /// `reattach` restores if the syscall fails.
    fn detach(&mut self, dir: Ino, name: &[u8]) -> Option<(u64, Ino)> {
        let (ino, n) = self
            .by_ino
            .iter()
            .find(|(_, n)| n.names.iter().any(|(d, m)| *d == dir && m == name))?;
        if n.names.len() != 1 || self.by_file.get(&n.file) != Some(ino) {
            return None;
        }
        let (file, ino) = (n.file, *ino);
        self.by_file.remove(&file);
        Some((file, ino))
    }

    /// The syscall after `detach` failed: the file keeps its number unless
    /// another file took its inode meanwhile.
    fn reattach(&mut self, detached: Option<(u64, Ino)>) {
        if let Some((file, ino)) = detached {
            if self.by_ino.contains_key(&ino) {
                self.by_file.entry(file).or_insert(ino);
            }
        }
    }

    /// `name` in `dir` is no longer bound to what it was (unlinked,
    /// replaced by a rename, imported).
    fn unname(&mut self, dir: Ino, name: &[u8]) {
        let hit = self.by_ino.iter_mut().find_map(|(ino, n)| {
            let at = n.names.iter().position(|(d, m)| *d == dir && m == name)?;
            n.names.swap_remove(at);
            Some(*ino)
        });
        if let Some(ino) = hit {
            self.prune(ino);
        }
    }
}

/// The tree and the inode numbers of its files.
pub(super) struct LocalTree {
    /// `store/local`, opened once.
    dir: File,
    maps: Mutex<Maps>,
    next: AtomicU64,
}

fn path_of(dir: Ino, name: &[u8]) -> CString {
    let mut p = dir.0.to_string().into_bytes();
    if !name.is_empty() {
        p.push(b'/');
        p.extend_from_slice(name);
    }
    // Names never hold NUL (the kernel passes C strings).
    CString::new(p).unwrap_or_default()
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ns(sec: i64, nsec: i64) -> u64 {
    (sec.max(0) as u64) * 1_000_000_000 + nsec.max(0) as u64
}

fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFDIR => Kind::Dir,
        _ => Kind::File,
    }
}

/// An error from the tree as the caller sees it (a name that is not there,
/// a full disk...), counted as an operating error only when it is one.
fn tree_error(e: io::Error, what: &str) -> Error {
    match errno_of(&e) {
        code @ (libc::ENOENT
        | libc::EEXIST
        | libc::ENOTEMPTY
        | libc::EISDIR
        | libc::ENOTDIR
        | libc::EINVAL
        | libc::ENOSPC
        | libc::EDQUOT
        | libc::EFBIG
        | libc::ELOOP) => Error::errno(code),
        _ => Error::io(e, what),
    }
}

impl LocalTree {
    pub fn open(store_root: &std::path::Path) -> Result<LocalTree> {
        let mut path = store_root.join(LOCAL_DIR);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // A store that cannot be written (a read-only mount of a store
            // from before the tree): its root stands in, which holds no
            // `<ino>/` folders, so the tree is empty.
            Err(e) if !path.exists() => {
                warn!("host-local tree {}: {e}; serving none", path.display());
                path = store_root.to_path_buf();
            }
            Err(e) => return Err(Error::io(e, format_args!("create {}", path.display()))),
        }
        let c = CString::new(path.as_os_str().as_bytes()).unwrap_or_default();
        // SAFETY: open(2) of a path we own; the descriptor goes into a File.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::io(
                io::Error::last_os_error(),
                format_args!("open {}", path.display()),
            ));
        }
        Ok(LocalTree {
            // SAFETY: `fd` was just opened and is owned by nobody else.
            dir: unsafe { File::from_raw_fd(fd) },
            maps: Mutex::default(),
            next: AtomicU64::new(1),
        })
    }

    fn fd(&self) -> libc::c_int {
        self.dir.as_raw_fd()
    }

    /// `fstatat` of a tree name (not following symlinks); None if absent.
    fn stat(&self, dir: Ino, name: &[u8]) -> io::Result<Option<libc::stat>> {
        let p = path_of(dir, name);
        // SAFETY: a zeroed stat is a valid out-buffer for fstatat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, C string and out-buffer.
        let rc =
            unsafe { libc::fstatat(self.fd(), p.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        match check(rc) {
            Ok(()) => Ok(Some(st)),
            Err(e) if matches!(errno_of(&e), libc::ENOENT | libc::ENOTDIR) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The number of the tree file `st` now at `name` in `dir`.
    fn bind(&self, dir: Ino, name: &[u8], st: &libc::stat, reference: bool) -> Ino {
        let mut m = self.maps.lock().unwrap();
        let file = st.st_ino;
        let ino = match m.by_file.get(&file) {
            Some(i) => *i,
            None => {
                let ino = Ino(Ino::LOCAL_BIT | self.next.fetch_add(1, Ordering::Relaxed));
                m.by_file.insert(file, ino);
                m.by_ino.insert(
                    ino,
                    Node {
                        names: Vec::new(),
                        file,
                        forward: None,
                        lookups: 0,
                        handles: 0,
                    },
                );
                ino
            }
        };
        let n = m.by_ino.get_mut(&ino).expect("by_file and by_ino agree");
        if !n.names.iter().any(|(d, x)| *d == dir && x == name) {
            n.names.push((dir, name.to_vec()));
        }
        if reference {
            n.lookups += 1;
        }
        ino
    }

    /// A name of `ino` to reach its file by, if it has one.
    fn name_of(&self, ino: Ino) -> Option<(Ino, Vec<u8>)> {
        let m = self.maps.lock().unwrap();
        m.by_ino.get(&ino).and_then(|n| n.names.first().cloned())
    }

    fn forward_of(&self, ino: Ino) -> Option<Ino> {
        let m = self.maps.lock().unwrap();
        m.by_ino.get(&ino).and_then(|n| n.forward)
    }

    /// Counts `n` kernel references (`lookup`) or handles (`!lookup`) off
    /// `ino`; returns where it forwards to.
    fn unref(&self, ino: Ino, n: u64, lookup: bool) -> Option<Ino> {
        let mut m = self.maps.lock().unwrap();
        let node = m.by_ino.get_mut(&ino)?;
        let count = if lookup {
            &mut node.lookups
        } else {
            &mut node.handles
        };
        debug_assert!(
            *count >= n,
            "ino={ino}: {n} references dropped, {count} held"
        );
        *count = count.saturating_sub(n);
        let forward = node.forward;
        m.prune(ino);
        forward
    }

    fn add_handle(&self, ino: Ino) {
        let mut m = self.maps.lock().unwrap();
        if let Some(node) = m.by_ino.get_mut(&ino) {
            node.handles += 1;
        }
    }

    /// Runs `op`, a syscall that may remove the last link of the file at
    /// `name` in `dir`, between `Maps::detach` and, if it fails,
    /// `Maps::reattach` (no syscall under the lock).
    fn removing<T>(
        &self,
        dir: Ino,
        name: &[u8],
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let detached = self.maps.lock().unwrap().detach(dir, name);
        let r = op();
        if r.is_err() {
            self.maps.lock().unwrap().reattach(detached);
        }
        r
    }

    /// Runs `op` on the tree path of `name` in `dir`, making the
    /// directory's tree first if it is missing.
    fn in_dir(&self, dir: Ino, mut op: impl FnMut() -> io::Result<()>) -> io::Result<()> {
        match op() {
            Err(e) if errno_of(&e) == libc::ENOENT => {
                let d = path_of(dir, b"");
                // SAFETY: mkdirat(2) with a valid descriptor and C string.
                let rc = unsafe { libc::mkdirat(self.fd(), d.as_ptr(), 0o700) };
                match check(rc) {
                    Ok(()) => {}
                    Err(e) if errno_of(&e) == libc::EEXIST => {}
                    Err(e) => return Err(e),
                }
                op()
            }
            r => r,
        }
    }

    fn attr(ino: Ino, st: &libc::stat) -> Attr {
        Attr {
            ino,
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: st.st_nlink as u32,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            atime_ns: ns(st.st_atime, st.st_atime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
            cacheable: true,
            rdev: 0,
        }
    }
}

/// Whether a tree file may be moved into the staging area as it is (no
/// writer holds it and it has no other name), else it is copied.
fn movable(st: &libc::stat, writers: u32) -> bool {
    writers == 0 && st.st_nlink <= 1
}

impl Core {
    /// The tree file of `name` in `parent`, if the tree has it.
    pub(super) fn local_lookup(&self, parent: Ino, name: &[u8]) -> Result<Option<Attr>> {
        let Some(st) = self
            .local
            .stat(parent, name)
            .map_err(|e| tree_error(e, "stat"))?
        else {
            return Ok(None);
        };
        let ino = self.local.bind(parent, name, &st, true);
        Ok(Some(LocalTree::attr(ino, &st)))
    }

    /// The inode bound to `name` in `parent`, in the tree or in RocksDB
    /// (no kernel reference counted).
    pub(super) fn child(&self, parent: Ino, name: &[u8]) -> Result<Option<Ino>> {
        match self
            .local
            .stat(parent, name)
            .map_err(|e| tree_error(e, "stat"))?
        {
            Some(st) => Ok(Some(self.local.bind(parent, name, &st, false))),
            None => self.store.dentry(parent, name),
        }
    }

    /// True if the tree has `name` in `parent` (for RocksDB's creating calls).
    pub(super) fn local_has(&self, parent: Ino, name: &[u8]) -> Result<bool> {
        Ok(self
            .local
            .stat(parent, name)
            .map_err(|e| tree_error(e, "stat"))?
            .is_some())
    }

    /// An entry the kernel is about to learn (lookup, link, create): an
    /// imported inode shows under the tree file's number while the kernel
    /// holds that (the reference counts on both: the caller counted it on
    /// the imported inode).
    pub(super) fn shown(&self, attr: Attr) -> Attr {
        if attr.ino.is_local() {
            return attr;
        }
        let mut m = self.local.maps.lock().unwrap();
        let Some(l) = m.shown_as.get(&attr.ino).copied() else {
            return attr;
        };
        match m.by_ino.get_mut(&l) {
            Some(n) => {
                n.lookups += 1;
                Attr { ino: l, ..attr }
            }
            None => attr,
        }
    }

    /// The RocksDB inode a tree file was imported as, or `ino` itself.
    pub(super) fn resolve(&self, ino: Ino) -> Ino {
        if ino.is_local() {
            self.local.forward_of(ino).unwrap_or(ino)
        } else {
            ino
        }
    }

    fn local_stat(&self, ino: Ino) -> Result<libc::stat> {
        let Some((dir, name)) = self.local.name_of(ino) else {
            return enoent();
        };
        match self
            .local
            .stat(dir, &name)
            .map_err(|e| tree_error(e, "stat"))?
        {
            Some(st) => Ok(st),
            None => enoent(),
        }
    }

    pub(super) fn local_getattr(&self, ino: Ino) -> Result<Attr> {
        let st = self.local_stat(ino)?;
        Ok(LocalTree::attr(ino, &st))
    }

    /// The attributes of an open tree file, through its handle's descriptor
    /// (also once its last name is gone).
    pub(super) fn local_fstat(ino: Ino, file: &File) -> Result<Attr> {
        // SAFETY: a zeroed stat is a valid out-buffer; the descriptor is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        check(unsafe { libc::fstat(file.as_raw_fd(), &mut st) })
            .map_err(|e| tree_error(e, "fstat"))?;
        Ok(LocalTree::attr(ino, &st))
    }

    pub(super) fn local_setattr(&self, ino: Ino, set: &SetAttr) -> Result<Attr> {
        let Some((dir, name)) = self.local.name_of(ino) else {
            return enoent();
        };
        let p = path_of(dir, &name);
        let fd = self.local.fd();
        let err = |e| tree_error(e, "setattr");
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.unwrap_or(u32::MAX);
            let gid = set.gid.unwrap_or(u32::MAX);
            // SAFETY: fchownat(2) with a valid descriptor and C string.
            check(unsafe { libc::fchownat(fd, p.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
                .map_err(err)?;
        }
        if let Some(mode) = set.mode {
            // SAFETY: fchmodat(2) (symlinks have no mode of their own on Linux).
            check(unsafe { libc::fchmodat(fd, p.as_ptr(), mode & 0o7777, 0) }).map_err(err)?;
        }
        if let Some(size) = set.size {
            let Ok(len) = i64::try_from(size) else {
                return Err(Error::errno(libc::EFBIG));
            };
            let full = self.local_full_path(dir, &name);
            // SAFETY: truncate(2) of a path below the store.
            check(unsafe { libc::truncate(full.as_ptr(), len) }).map_err(err)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            // A touch to now takes the daemon's clock (never behind wall
            // time, so ccache's stale-lock check on `.alive` files sees it
            // move), written as an explicit time.
            let now = set.touches().then(|| self.now());
            let ts = |t: Option<SetTime>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(SetTime::Now) => {
                    let t = now.unwrap_or_default();
                    libc::timespec {
                        tv_sec: (t / 1_000_000_000) as i64,
                        tv_nsec: (t % 1_000_000_000) as i64,
                    }
                }
                Some(SetTime::At(t)) => libc::timespec {
                    tv_sec: (t / 1_000_000_000) as i64,
                    tv_nsec: (t % 1_000_000_000) as i64,
                },
            };
            let times = [ts(set.atime), ts(set.mtime)];
            // SAFETY: utimensat(2) with a valid descriptor, C string and times.
            check(unsafe {
                libc::utimensat(fd, p.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
            })
            .map_err(err)?;
        }
        self.local_getattr(ino)
    }

    /// The absolute path of a tree name (for the calls without an `*at` form).
    fn local_full_path(&self, dir: Ino, name: &[u8]) -> CString {
        let mut p = self
            .store
            .root
            .join(LOCAL_DIR)
            .into_os_string()
            .into_vec_bytes();
        p.push(b'/');
        p.extend_from_slice(path_of(dir, name).as_bytes());
        CString::new(p).unwrap_or_default()
    }

    pub(super) fn local_readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let Some((dir, name)) = self.local.name_of(ino) else {
            return enoent();
        };
        self.local_readlink_at(dir, &name)
    }

    /// Opens the tree file of `ino` with the client's access mode.
    pub(super) fn local_open_file(&self, ino: Ino, flags: i32) -> Result<File> {
        let Some((dir, name)) = self.local.name_of(ino) else {
            return enoent();
        };
        self.local_open_rw(dir, &name, flags & libc::O_TRUNC, flags)
    }

    /// Opens a tree file for reading and writing whatever the client asked
    /// (`extra`: `O_TRUNC`, creation flags): the handle enforces the
    /// client's access mode, and with passthrough one backing file per
    /// inode serves every open of it, so it must allow both. Never
    /// `O_APPEND` on the descriptor (a backing file's own flags apply to
    /// every write through it); the client's `O_APPEND` comes with each
    /// write. Falls back to the client's access mode where the daemon may
    /// not write the file.
    fn local_open_rw(&self, dir: Ino, name: &[u8], extra: i32, flags: i32) -> Result<File> {
        let extra = extra | libc::O_NOFOLLOW;
        match self.local_openat(dir, name, libc::O_RDWR | extra, 0o600) {
            Err(e)
                if matches!(
                    e.code(),
                    libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY
                ) =>
            {
                self.local_openat(dir, name, (flags & libc::O_ACCMODE) | extra, 0o600)
            }
            r => r,
        }
    }

    fn local_openat(&self, dir: Ino, name: &[u8], flags: i32, mode: u32) -> Result<File> {
        let p = path_of(dir, name);
        // SAFETY: openat(2) with a valid descriptor and C string.
        let fd =
            unsafe { libc::openat(self.local.fd(), p.as_ptr(), flags | libc::O_CLOEXEC, mode) };
        if fd < 0 {
            return Err(tree_error(io::Error::last_os_error(), "open"));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The owner and group a new tree file gets (a setgid directory hands
    /// its group down).
    fn local_owner(&self, parent: Ino, caller: Caller) -> Result<(u32, u32)> {
        let dir = self.inode(parent)?;
        let gid = if dir.perm & 0o2000 != 0 {
            dir.gid
        } else {
            caller.gid
        };
        Ok((caller.uid, gid))
    }

    /// Creates `name` in `parent` in the tree: returns the new file's
    /// attributes and descriptor, or None if the name is not the tree's
    /// (not local-class, or RocksDB holds it).
    pub(super) fn local_create(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<Option<(Attr, File, bool)>> {
        if self.class_of(parent, name)? != Class::Local
            || self.store.dentry(parent, name)?.is_some()
        {
            return Ok(None);
        }
        self.check_space(0)?;
        let (uid, gid) = self.local_owner(parent, caller)?;
        let _g = self.lock(&[parent]);
        let open_flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let mut file = None;
        let made = self.local.in_dir(parent, || {
            let p = path_of(parent, name);
            // SAFETY: openat(2) with a valid descriptor and C string.
            let fd = unsafe {
                libc::openat(
                    self.local.fd(),
                    p.as_ptr(),
                    open_flags | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just opened and is owned by nobody else.
            file = Some(unsafe { File::from_raw_fd(fd) });
            Ok(())
        });
        match made {
            Ok(()) => {}
            Err(e) if errno_of(&e) == libc::EEXIST && flags & libc::O_EXCL == 0 => {
                drop(_g);
                // Made meanwhile: open it as it is.
                let Some(attr) = self.local_lookup(parent, name)? else {
                    return Err(Error::errno(libc::EAGAIN));
                };
                let file = self.local_open_file(attr.ino, flags & !libc::O_CREAT)?;
                return Ok(Some((attr, file, false)));
            }
            Err(e) => return Err(tree_error(e, "create")),
        }
        let file = file.expect("set by a successful create");
        let fd = file.as_raw_fd();
        // SAFETY: fchown(2)/fchmod(2) on the descriptor just opened (the
        // mode after the owner: a chown clears setuid and setgid).
        let owned = check(unsafe { libc::fchown(fd, uid, gid) })
            .and_then(|_| check(unsafe { libc::fchmod(fd, mode & 0o7777) }));
        if let Err(e) = owned {
            let p = path_of(parent, name);
            // SAFETY: unlinkat(2) of the name just created.
            unsafe { libc::unlinkat(self.local.fd(), p.as_ptr(), 0) };
            return Err(tree_error(e, "create"));
        }
        // SAFETY: a zeroed stat is a valid out-buffer; the descriptor is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        check(unsafe { libc::fstat(fd, &mut st) }).map_err(|e| tree_error(e, "fstat"))?;
        let ino = self.local.bind(parent, name, &st, true);
        Ok(Some((LocalTree::attr(ino, &st), file, true)))
    }

    /// `symlink` of a local-class name: one `symlinkat` in the tree. None if
    /// the name is not the tree's.
    pub(super) fn local_symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> Result<Option<Attr>> {
        if self.class_of(parent, name)? != Class::Local {
            return Ok(None);
        }
        if self.store.dentry(parent, name)?.is_some() {
            return Err(Error::errno(libc::EEXIST));
        }
        self.check_space(0)?;
        let (uid, gid) = self.local_owner(parent, caller)?;
        let Ok(t) = CString::new(target) else {
            return Err(Error::errno(libc::EINVAL));
        };
        let _g = self.lock(&[parent]);
        let p = path_of(parent, name);
        let fd = self.local.fd();
        self.local
            .in_dir(parent, || {
                // SAFETY: symlinkat(2) with valid C strings and descriptor.
                check(unsafe { libc::symlinkat(t.as_ptr(), fd, p.as_ptr()) })
            })
            .map_err(|e| tree_error(e, "symlink"))?;
        // SAFETY: fchownat(2) of the link itself.
        if let Err(e) =
            check(unsafe { libc::fchownat(fd, p.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        {
            // SAFETY: unlinkat(2) of the name just made.
            unsafe { libc::unlinkat(fd, p.as_ptr(), 0) };
            return Err(tree_error(e, "symlink"));
        }
        match self.local_lookup(parent, name)? {
            Some(a) => Ok(Some(a)),
            None => Err(Error::errno(libc::EAGAIN)),
        }
    }

    /// `unlink` of a tree name; false if the tree does not have it.
    pub(super) fn local_unlink(&self, parent: Ino, name: &[u8]) -> Result<bool> {
        let _g = self.lock(&[parent]);
        let p = path_of(parent, name);
        let fd = self.local.fd();
        match self.local.removing(parent, name, || {
            // SAFETY: unlinkat(2) with a valid descriptor and C string.
            check(unsafe { libc::unlinkat(fd, p.as_ptr(), 0) })
        }) {
            Ok(()) => {
                self.local.maps.lock().unwrap().unname(parent, name);
                Ok(true)
            }
            Err(e) if matches!(errno_of(&e), libc::ENOENT | libc::ENOTDIR) => Ok(false),
            Err(e) => Err(tree_error(e, "unlink")),
        }
    }

    /// A rename whose source is a tree name. Returns false if the tree does
    /// not have the source. A local-class target RocksDB does not hold is
    /// one `renameat2`; any other target imports the source first and
    /// leaves the rename to RocksDB's code (false).
    pub(super) fn local_rename(
        &self,
        (parent, name): (Ino, &[u8]),
        (newparent, newname): (Ino, &[u8]),
        flags: u32,
    ) -> Result<bool> {
        let Some(st) = self
            .local
            .stat(parent, name)
            .map_err(|e| tree_error(e, "stat"))?
        else {
            return Ok(false);
        };
        if kind_of(st.st_mode) == Kind::Dir {
            return Ok(false);
        }
        let in_tree = self.class_of(newparent, newname)? == Class::Local
            && self.store.dentry(newparent, newname)?.is_none();
        if !in_tree {
            if flags & libc::RENAME_EXCHANGE != 0 {
                return Err(Error::errno(libc::EXDEV));
            }
            self.local_import(parent, name)?;
            return Ok(false);
        }
        let _g = self.lock(&[parent, newparent]);
        let (p, q) = (path_of(parent, name), path_of(newparent, newname));
        let fd = self.local.fd();
        // An exchange keeps both files linked; any other rename may unlink
        // the target's file.
        let replaced = if flags & libc::RENAME_EXCHANGE != 0 {
            None
        } else {
            self.local.maps.lock().unwrap().detach(newparent, newname)
        };
        self.local
            .in_dir(newparent, || {
                // SAFETY: renameat2(2) within the tree.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        fd,
                        p.as_ptr(),
                        fd,
                        q.as_ptr(),
                        flags as libc::c_uint,
                    )
                };
                check(rc as libc::c_int)
            })
            .map_err(|e| {
                self.local.maps.lock().unwrap().reattach(replaced);
                tree_error(e, "rename")
            })?;
        let mut m = self.local.maps.lock().unwrap();
        let src = m.by_file.get(&st.st_ino).copied();
        if flags & libc::RENAME_EXCHANGE != 0 {
            // Both names stay bound, each to the other's file.
            for n in m.by_ino.values_mut() {
                for (d, x) in n.names.iter_mut() {
                    if *d == parent && x == name {
                        (*d, *x) = (newparent, newname.to_vec());
                    } else if *d == newparent && x == newname {
                        (*d, *x) = (parent, name.to_vec());
                    }
                }
            }
            return Ok(true);
        }
        if (parent, name) == (newparent, newname) {
            return Ok(true);
        }
        m.unname(newparent, newname);
        if let Some(n) = src.and_then(|s| m.by_ino.get_mut(&s)) {
            if let Some(at) = n.names.iter_mut().find(|(d, x)| *d == parent && x == name) {
                *at = (newparent, newname.to_vec());
            } else if !n.names.iter().any(|(d, x)| *d == newparent && x == newname) {
                n.names.push((newparent, newname.to_vec()));
            }
        }
        Ok(true)
    }

    /// A link of tree file `ino` to `newname` in `newparent`. Some(attr) if
    /// done in the tree (one `linkat`); None if the source was imported and
    /// the link is RocksDB's to make (a shared or RocksDB-held name).
    pub(super) fn local_link(
        &self,
        ino: Ino,
        newparent: Ino,
        newname: &[u8],
    ) -> Result<Option<Attr>> {
        let Some((dir, name)) = self.local.name_of(ino) else {
            return enoent();
        };
        let st = self.local_stat(ino)?;
        let in_tree = kind_of(st.st_mode) == Kind::Symlink
            || (self.class_of(newparent, newname)? == Class::Local
                && self.store.dentry(newparent, newname)?.is_none());
        if !in_tree {
            self.local_import(dir, &name)?;
            return Ok(None);
        }
        if self.store.dentry(newparent, newname)?.is_some() {
            return Err(Error::errno(libc::EEXIST));
        }
        let _g = self.lock(&[dir, newparent]);
        let (p, q) = (path_of(dir, &name), path_of(newparent, newname));
        let fd = self.local.fd();
        self.local
            .in_dir(newparent, || {
                // SAFETY: linkat(2) within the tree.
                check(unsafe { libc::linkat(fd, p.as_ptr(), fd, q.as_ptr(), 0) })
            })
            .map_err(|e| tree_error(e, "link"))?;
        drop(_g);
        match self.local_lookup(newparent, newname)? {
            Some(a) => Ok(Some(a)),
            None => Err(Error::errno(libc::EAGAIN)),
        }
    }

    /// Moves the tree file at `name` in `parent` into RocksDB: a staged
    /// inode of class `local` bound to that name, whose bytes are the file
    /// (moved, or copied when a writer holds it or it has other names). The
    /// tree file's inode forwards to it from now on. Returns the new inode.
    pub(super) fn local_import(&self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let Some(st) = self
            .local
            .stat(parent, name)
            .map_err(|e| tree_error(e, "stat"))?
        else {
            return enoent();
        };
        let kind = kind_of(st.st_mode);
        let target = if kind == Kind::Symlink {
            Some(self.local_readlink_at(parent, name)?)
        } else {
            None
        };
        let old = self
            .local
            .maps
            .lock()
            .unwrap()
            .by_file
            .get(&st.st_ino)
            .copied();
        let writers = old.map_or(0, |o| self.usage.writers(o));
        // Handles open on the tree file hold the imported inode too (it is
        // the file they read, or was when a copy was taken), until they are
        // released (`local_handle`): eviction leaves open files alone.
        let open = old.map_or(0, |o| self.usage.handles(o));
        let ino = self.alloc_ino()?;
        for _ in 0..open {
            self.usage.open(ino, false);
        }
        // So do the kernel's references to it (`local_forget`).
        let lookups = old.map_or(0, |o| {
            let m = self.local.maps.lock().unwrap();
            m.by_ino.get(&o).map_or(0, |n| n.lookups)
        });
        for _ in 0..lookups {
            self.usage.remember(ino);
        }
        let _g = self.lock(&[parent, ino]);
        let detached = self.local.maps.lock().unwrap().detach(parent, name);
        let moved = self.local_import_file(kind, &st, writers, (parent, name), ino);
        if moved.is_err() {
            self.local.maps.lock().unwrap().reattach(detached);
        }
        moved?;
        let mtime = ns(st.st_mtime, st.st_mtime_nsec);
        let ctime = ns(st.st_ctime, st.st_ctime_nsec);
        // A time a client set (`utimensat`) moves the ctime, not to the
        // mtime it sets; a write stamps both alike. So an mtime unlike the
        // ctime was set by a client and the publication keeps it; any other
        // is stamped by the daemon's clock when it publishes.
        let mtime_set = mtime != ctime;
        let inode = Inode {
            ino,
            kind,
            class: Class::Local,
            perm: (st.st_mode & 0o7777) as u16,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: 1,
            size: st.st_size as u64,
            mtime_ns: mtime,
            atime_ns: Some(ns(st.st_atime, st.st_atime_nsec)),
            ctime_ns: ctime,
            mtime_set,
            parent,
            name: name.to_vec(),
            links: Vec::new(),
            content: match target {
                Some(t) => Content::Symlink(t),
                None => Content::Staged,
            },
        };
        let mut txn = self.txn();
        txn.batch.put_inode(&inode);
        txn.batch.put_dentry(parent, name, ino);
        let committed = self.commit(txn);
        {
            let mut m = self.local.maps.lock().unwrap();
            m.unname(parent, name);
            if let Some(o) = old {
                if let Some(n) = m.by_ino.get_mut(&o) {
                    if n.names.is_empty() {
                        n.forward = Some(ino);
                        m.shown_as.insert(ino, o);
                    }
                }
            }
        }
        if let Err(e) = committed {
            for _ in 0..open {
                self.usage.close(ino, false);
            }
            self.usage.forget(ino, lookups);
            self.blobs.remove_staging(ino);
            return Err(e);
        }
        debug!(
            "import name={:?} ino={ino} outcome=moved-to-store",
            String::from_utf8_lossy(name)
        );
        Ok(ino)
    }

    /// The bytes of the tree file at `name` into `staging/<ino>`: moved,
    /// or copied when a writer holds it or it has other links (a writer's
    /// late release: ccache closes its temporary before the rename, and the
    /// kernel sends RELEASE asynchronously, so it may arrive after it).
    /// Writes a program makes through such a handle after the rename reach
    /// the tree file, not the copy: a gap against POSIX that ccache never
    /// meets (doc/semantics.md).
    fn local_import_file(
        &self,
        kind: Kind,
        st: &libc::stat,
        writers: u32,
        (parent, name): (Ino, &[u8]),
        ino: Ino,
    ) -> Result<()> {
        let p = path_of(parent, name);
        let fd = self.local.fd();
        if kind == Kind::File {
            let staging = self.blobs.staging_path(ino);
            if movable(st, writers) {
                let to = CString::new(staging.as_os_str().as_bytes()).unwrap_or_default();
                // SAFETY: renameat(2) from the tree into the staging folder
                // (one filesystem).
                check(unsafe { libc::renameat(fd, p.as_ptr(), libc::AT_FDCWD, to.as_ptr()) })
                    .map_err(|e| tree_error(e, "import"))?;
            } else {
                let from = self.local_full_path(parent, name);
                let from = std::path::Path::new(std::ffi::OsStr::from_bytes(from.as_bytes()));
                std::fs::copy(from, &staging).map_err(|e| Error::io(e, "import copy"))?;
                // SAFETY: unlinkat(2) of the tree name just copied.
                check(unsafe { libc::unlinkat(fd, p.as_ptr(), 0) })
                    .map_err(|e| tree_error(e, "import"))?;
            }
        } else {
            // SAFETY: unlinkat(2) of the tree name (its target is kept).
            check(unsafe { libc::unlinkat(fd, p.as_ptr(), 0) })
                .map_err(|e| tree_error(e, "import"))?;
        }
        Ok(())
    }

    fn local_readlink_at(&self, parent: Ino, name: &[u8]) -> Result<Vec<u8>> {
        let p = path_of(parent, name);
        let mut buf = vec![0u8; crate::fs::SYMLINK_BYTES_MAX + 1];
        // SAFETY: readlinkat(2) into a buffer of the given length.
        let n = unsafe {
            libc::readlinkat(
                self.local.fd(),
                p.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(tree_error(io::Error::last_os_error(), "readlink"));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Adds the tree's names in `dir` to a listing.
    pub(super) fn local_list(&self, dir: Ino, entries: &mut Vec<DirEntry>) -> Result<()> {
        let path = self.store.root.join(LOCAL_DIR).join(dir.0.to_string());
        let rd = match std::fs::read_dir(&path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(e, "list local names")),
        };
        let m = self.local.maps.lock().unwrap();
        for e in rd.flatten().take(crate::fs::DIR_ENTRIES_MAX) {
            let kind = match e.file_type() {
                Ok(t) if t.is_symlink() => Kind::Symlink,
                _ => Kind::File,
            };
            let file = std::os::unix::fs::DirEntryExt::ino(&e);
            // A file not looked up yet shows a number outside every range
            // the daemon hands out (readdir's numbers are informational).
            let ino = m.by_file.get(&file).copied().unwrap_or(Ino(Ino::LOCAL_BIT
                | Ino::LOCAL_UNSEEN_BIT
                | (file & 0xffff_ffff_ffff)));
            entries.push(DirEntry {
                ino,
                kind,
                name: e.file_name().as_bytes().to_vec(),
            });
        }
        Ok(())
    }

    /// True if directory `dir` has no tree names; an empty tree folder is
    /// removed (under the directory's stripe, which the caller holds).
    pub(super) fn local_dir_clear(&self, dir: Ino) -> Result<bool> {
        let d = path_of(dir, b"");
        // SAFETY: unlinkat(2) of a folder (AT_REMOVEDIR) with a valid descriptor.
        match check(unsafe { libc::unlinkat(self.local.fd(), d.as_ptr(), libc::AT_REMOVEDIR) }) {
            Ok(()) => Ok(true),
            Err(e) if errno_of(&e) == libc::ENOENT => Ok(true),
            Err(e) if matches!(errno_of(&e), libc::ENOTEMPTY | libc::EEXIST) => Ok(false),
            Err(e) => Err(tree_error(e, "rmdir")),
        }
    }

    /// The later of a directory's record times and its tree folder's
    /// (names created in the tree change the folder, not the record).
    pub(super) fn local_dir_times(&self, attr: &mut Attr) {
        if let Ok(Some(st)) = self.local.stat(attr.ino, b"") {
            attr.mtime_ns = attr.mtime_ns.max(ns(st.st_mtime, st.st_mtime_nsec));
            attr.ctime_ns = attr.ctime_ns.max(ns(st.st_ctime, st.st_ctime_nsec));
        }
    }

    /// The kernel forgot `n` references to tree file `ino` (and so to the
    /// inode it was imported as, which holds them since).
    pub(super) fn local_forget(&self, ino: Ino, n: u64) {
        if let Some(r) = self.local.unref(ino, n, true) {
            self.forget(r, n);
        }
    }

    /// A handle of tree file `ino` opened / released. A handle opened
    /// before its file was imported also held the imported inode.
    pub(super) fn local_handle(&self, ino: Ino, open: bool) -> Result<()> {
        if open {
            self.local.add_handle(ino);
            return Ok(());
        }
        if let Some(r) = self.local.unref(ino, 1, false) {
            self.usage.close(r, false);
            self.maybe_forget(r)?;
        }
        Ok(())
    }

    /// At start: removes the tree folders of directories that are gone.
    pub(super) fn recover_local(&self) -> Result<()> {
        let path = self.store.root.join(LOCAL_DIR);
        let Ok(rd) = std::fs::read_dir(&path) else {
            return Ok(());
        };
        let mut removed = 0;
        for e in rd.flatten() {
            let keep = match e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
                Some(n) => matches!(self.store.inode(Ino(n))?, Some(i) if i.kind == Kind::Dir),
                None => false,
            };
            if !keep {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    warn!("remove local folder {}: {err}", e.path().display());
                }
                removed += 1;
            }
        }
        if removed > 0 {
            info!("recovery: removed {removed} local folders of directories that are gone");
        }
        Ok(())
    }
}

trait IntoVecBytes {
    fn into_vec_bytes(self) -> Vec<u8>;
}

impl IntoVecBytes for std::ffi::OsString {
    fn into_vec_bytes(self) -> Vec<u8> {
        std::os::unix::ffi::OsStringExt::into_vec(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_file(file: u64, dir: Ino, name: &[u8]) -> (Maps, Ino) {
        let ino = Ino(Ino::LOCAL_BIT | 1);
        let mut m = Maps::default();
        m.by_file.insert(file, ino);
        m.by_ino.insert(
            ino,
            Node {
                names: vec![(dir, name.to_vec())],
                file,
                forward: None,
                lookups: 1,
                handles: 0,
            },
        );
        (m, ino)
    }

    /// A file ext4 makes in the inode of a removed tree file (its number
    /// is reused at once) must not be bound to the removed file's number,
    /// which the kernel may still hold under the name a rename gave it.
    #[test]
    fn a_reused_ext4_inode_never_inherits_the_removed_files_number() {
        let dir = Ino(300);
        let (mut m, _old) = one_file(7, dir, b"r.tmp");
        let detached = m.detach(dir, b"r.tmp");
        assert!(detached.is_some());
        assert_eq!(
            m.by_file.get(&7),
            None,
            "the removed file's inode is forgotten"
        );
        m.unname(dir, b"r.tmp");
        assert_eq!(m.by_file.get(&7), None);
    }

    #[test]
    fn a_failed_removal_keeps_the_files_number() {
        let dir = Ino(300);
        let (mut m, ino) = one_file(7, dir, b"stats");
        let detached = m.detach(dir, b"stats");
        m.reattach(detached);
        assert_eq!(m.by_file.get(&7), Some(&ino));
    }

    #[test]
    fn a_file_with_another_known_name_keeps_its_number() {
        let dir = Ino(300);
        let (mut m, ino) = one_file(7, dir, b"a");
        m.by_ino
            .get_mut(&ino)
            .unwrap()
            .names
            .push((dir, b"b".to_vec()));
        assert_eq!(m.detach(dir, b"a"), None);
        assert_eq!(m.by_file.get(&7), Some(&ino));
    }
}
