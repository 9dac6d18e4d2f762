//! Names and attributes: lookup, getattr and setattr, directories, symlinks,
//! special files (mknod), unlink, rename and link.
//!
//! Invariants:
//! - A name is read and the kernel's reference to what it names is counted
//!   under the directory's stripe (shared), so an unbind, which holds the
//!   stripe exclusively, either comes before (the lookup misses) or sees the
//!   reference (the inode stays until the kernel forgets it).
//! - A rename or link onto a published result keeps the result (create-only)
//!   and counts a conflict; anything else is replaced as on a local disk.
//!   A rename replaces a result that fails its own format's checksum with a
//!   newcomer that passes it (checked before any lock is taken).
//! - Symlinks and special files (fifos, sockets, device nodes; kind and
//!   device number in the inode record) are host-local metadata-only nodes:
//!   never shared, never published.
//! - A rename that publishes prepares the blob (hash, sync, link) before it
//!   takes a lock, and re-checks under the locks that nothing changed.

use log::debug;

use crate::classes::Class;
use crate::error::{enoent, Error, Result};
use crate::fs::locks::{Held, InodeGuard, Level};
use crate::fs::publish::{Prepared, Share};
use crate::fs::txn::{After, Txn};
use crate::fs::{
    check_name, Attr, Caller, Core, DirEntry, Invalidate, SetAttr, SetTime, DIR_ENTRIES_MAX,
    NAME_BYTES_MAX, RETRIES_MAX, SYMLINK_BYTES_MAX,
};
use crate::stats::Stats;
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{Content, Inode, Kind};

impl Core {
    /// Locks `fixed` plus each directory in `names` and the inode its name
    /// is bound to now, re-reading the names after locking until they are
    /// stable. Returns the guard and the bound inodes, in `names` order.
    pub(super) fn lock_names(
        &self,
        fixed: &[Ino],
        names: &[(Ino, &[u8])],
    ) -> Result<(InodeGuard<'_>, Vec<Option<Ino>>)> {
        let read = |names: &[(Ino, &[u8])]| -> Result<Vec<Option<Ino>>> {
            names
                .iter()
                .map(|(p, n)| self.store.dentry(*p, n))
                .collect()
        };
        let mut found = read(names)?;
        for _ in 0..RETRIES_MAX {
            let mut set = fixed.to_vec();
            set.extend(names.iter().map(|(p, _)| *p));
            set.extend(found.iter().flatten());
            let guard = self.lock(&set);
            let again = read(names)?;
            if again == found {
                return Ok((guard, found));
            }
            found = again;
        }
        Err(Error::with_context(
            libc::EAGAIN,
            "names kept changing while locking them",
        ))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.lookup_name(parent, name).map(|a| self.shown(a))
    }

    fn lookup_name(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        Stats::bump(&self.stats.counters.lookups);
        if name.len() > NAME_BYTES_MAX {
            return Err(Error::errno(libc::ENAMETOOLONG));
        }
        if let Some(answer) = self.lookup_virtual(parent, name) {
            return answer;
        }
        if let Some(attr) = self.local_lookup(parent, name)? {
            return Ok(attr);
        }
        let found = {
            let _shared = self.inode_locks.read(parent, &self.stats.lock_wait);
            match self.store.dentry(parent, name)? {
                Some(ino) => match self.store.inode(ino)? {
                    Some(inode) => {
                        // Under the lock: an eviction or drop sees the reference.
                        self.usage.remember(ino);
                        Some(inode)
                    }
                    None => None,
                },
                None => None,
            }
        };
        if let Some(inode) = found {
            // A shared mutable entry past its freshness bound is checked
            // against the tier first (no lock held).
            return self.refresh_shared(inode);
        }
        if self.store.inode(parent)?.is_none() {
            return enoent();
        }
        if let Some(attr) = self.lookup_shared(parent, name)? {
            return Ok(attr);
        }
        Stats::bump(&self.stats.counters.misses);
        enoent()
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        if ino.is_local() {
            return self.local_forget(ino, n);
        }
        if self.usage.forget(ino, n) {
            self.forget_remote(ino);
            if let Err(e) = self.maybe_forget(ino) {
                log::warn!("forget ino={ino}: {e}");
            }
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        if ino.is_virtual() {
            return Ok(self.virtual_attr(ino));
        }
        if ino.is_local() {
            return match self.resolve(ino) {
                r if r == ino => self.local_getattr(ino),
                r => self.getattr(r).map(|a| Attr { ino, ..a }),
            };
        }
        match self.store.inode(ino)? {
            Some(inode) => {
                let mut attr = self.attr_of(&inode);
                if inode.kind == Kind::Dir {
                    self.local_dir_times(&mut attr);
                }
                Ok(attr)
            }
            // Shown from its shared record only.
            None => self.remote_getattr(ino).map_or_else(enoent, Ok),
        }
    }

    fn refuse_virtual(ino: Ino) -> Result<()> {
        if ino.is_virtual() {
            return Err(Error::errno(libc::EROFS));
        }
        Ok(())
    }

    pub fn setattr(&self, ino: Ino, set: SetAttr) -> Result<Attr> {
        if ino.is_virtual() {
            return self.setattr_virtual(ino, &set);
        }
        self.writable()?;
        if ino.is_local() {
            return match self.resolve(ino) {
                r if r == ino => self.local_setattr(ino, &set),
                r => self.setattr(r, set).map(|a| Attr { ino, ..a }),
            };
        }
        self.materialize(ino)?;
        // A truncate writes the file: no publication may be sealing it.
        let truncates = set.size.is_some();
        if set.size.is_some_and(|size| size > 0) {
            self.check_before_copy(ino)?;
        }
        if truncates {
            self.usage.open(ino, true);
        }
        let result = self.setattr_locked(ino, &set);
        if !truncates {
            return Ok(self.attr_of(&result?));
        }
        self.usage.close(ino, true);
        result?;
        // A truncated file in a shared class that no one writes is published.
        self.publish_if_idle(ino, Share::Now)?;
        Ok(self.attr_of(&self.inode(ino)?))
    }

    fn setattr_locked(&self, ino: Ino, set: &SetAttr) -> Result<Inode> {
        let _g = self.lock(&[ino]);
        let mut inode = self.inode(ino)?;
        let mut txn = self.txn();
        let now = self.now();
        if let Some(mode) = set.mode {
            inode.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            inode.uid = uid;
        }
        if let Some(gid) = set.gid {
            inode.gid = gid;
        }
        if let Some(size) = set.size {
            if inode.kind == Kind::Dir {
                return Err(Error::errno(libc::EISDIR));
            }
            match (&inode.content, inode.class) {
                (Content::Blob(_), Class::Result) => {
                    // Create-only: a published result's bytes never change.
                    Stats::bump(&self.stats.counters.conflicts);
                    debug!("truncate ino={ino} outcome=kept-existing-result");
                }
                (Content::Blob(id), _) => {
                    let id = *id;
                    self.lock_blobs(&mut txn, &[id]);
                    self.copy_up(&mut txn, &mut inode, Some(size))?;
                    inode.stamp(now);
                }
                (Content::Staged, _) => {
                    let f = self.blobs.open_staging(ino, true)?;
                    f.set_len(size).map_err(|e| Error::io(e, "truncate"))?;
                    inode.size = size;
                    inode.stamp(now);
                }
                _ => return Err(Error::errno(libc::EINVAL)),
            }
        }
        // The daemon's clock for "now"; an explicit time is kept as given,
        // also through the close and the publication of a file open for
        // writing (`mtime_set`): the writes before it are older than the
        // time the client set, so they no longer stamp the mtime at FLUSH.
        // A write after it stamps again, as on a local disk.
        let old_mtime = inode.mtime_ns;
        match set.mtime {
            Some(SetTime::Now) => {
                inode.mtime_ns = now;
                inode.mtime_set = false;
            }
            Some(SetTime::At(t)) => {
                inode.mtime_ns = t;
                inode.mtime_set = true;
                if self.usage.take_written(ino) && inode.content == Content::Staged {
                    // What the FLUSH of those writes would have recorded.
                    if let Ok(m) = std::fs::metadata(self.blobs.staging_path(ino)) {
                        inode.size = std::os::unix::fs::MetadataExt::size(&m);
                    }
                }
            }
            None => {}
        }
        match set.atime {
            // Both to now (a plain touch): the access time follows the mtime.
            Some(SetTime::Now) if set.mtime == Some(SetTime::Now) => inode.atime_ns = None,
            Some(SetTime::Now) => inode.atime_ns = Some(now),
            Some(SetTime::At(t)) => inode.atime_ns = Some(t),
            // An mtime change alone leaves the access time where it was.
            None if set.mtime.is_some() && inode.atime_ns.is_none() => {
                inode.atime_ns = Some(old_mtime)
            }
            None => {}
        }
        inode.ctime_ns = now;
        // A touch of a published file (ccache's LRU mark, on every hit) is
        // remembered and written in a later batch (`store/touches.rs`).
        let times_only =
            set.mode.is_none() && set.uid.is_none() && set.gid.is_none() && set.size.is_none();
        if times_only
            && matches!(inode.content, Content::Blob(_))
            && self.store.touches.remember(&inode)
        {
            return Ok(inode);
        }
        txn.batch.put_inode(&inode);
        self.commit(txn)?;
        Ok(inode)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let ino = self.resolve(ino);
        if ino.is_local() {
            return self.local_readlink(ino);
        }
        match self.inode(ino)?.content {
            Content::Symlink(t) => Ok(t),
            _ => Err(Error::errno(libc::EINVAL)),
        }
    }

    pub fn access(&self, ino: Ino) -> Result<()> {
        if ino.is_local() {
            return self.getattr(ino).map(|_| ());
        }
        if !ino.is_virtual()
            && self.store.inode(ino)?.is_none()
            && self.remote_getattr(ino).is_none()
        {
            return enoent();
        }
        Ok(())
    }

    /// The path components of `name` in `parent`, below the mount root.
    pub(super) fn path_of(&self, parent: Ino, name: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut parts = vec![name.to_vec()];
        let mut at = parent;
        let mut depth = 0;
        while at != Ino::ROOT {
            let dir = self.inode(at)?;
            parts.push(dir.name.clone());
            at = dir.parent;
            depth += 1;
            if depth > 4096 {
                return Err(Error::with_context(
                    libc::EIO,
                    format!("directory loop above ino {parent}"),
                ));
            }
        }
        parts.reverse();
        Ok(parts)
    }

    /// True if a file created under this name is bound to it only when it
    /// is closed (create-only classes): the kernel must not cache that the
    /// name is absent, since no request tells it when the name appears.
    pub fn binds_at_close(&self, parent: Ino, name: &[u8]) -> bool {
        !parent.is_virtual()
            && matches!(
                self.class_of(parent, name),
                Ok(Class::Result | Class::CcacheEntry)
            )
    }

    pub(super) fn class_of(&self, parent: Ino, name: &[u8]) -> Result<Class> {
        let parts = self.path_of(parent, name)?;
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        Ok(self.config.rules.classify(&refs))
    }

    /// Checks that `parent` is a writable directory of ours and `name` is
    /// a name we may create there.
    pub(super) fn check_new_name(&self, parent: Ino, name: &[u8]) -> Result<()> {
        if parent.is_virtual() {
            return Err(Error::errno(libc::EROFS));
        }
        self.writable()?;
        check_name(name)?;
        if parent.is_local() {
            return Err(Error::errno(libc::ENOTDIR));
        }
        if Self::is_stats_name(parent, name) {
            return Err(Error::errno(libc::EEXIST));
        }
        if self.inode(parent)?.kind != Kind::Dir {
            return Err(Error::errno(libc::ENOTDIR));
        }
        // A name shown from its shared record is bound first, so the new
        // binding meets it as it meets any existing name.
        self.materialize_name(parent, name);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn new_inode(
        &self,
        ino: Ino,
        kind: Kind,
        class: Class,
        perm: u16,
        caller: Caller,
        dir: &Inode,
        name: &[u8],
        now: u64,
    ) -> Inode {
        // A setgid directory hands its group (and, to subdirectories, the bit) down.
        let setgid = dir.perm & 0o2000 != 0;
        let gid = if setgid { dir.gid } else { caller.gid };
        let perm = if setgid && kind == Kind::Dir {
            perm | 0o2000
        } else {
            perm
        };
        Inode {
            ino,
            kind,
            class,
            perm,
            uid: caller.uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            mtime_ns: now,
            atime_ns: None,
            ctime_ns: now,
            mtime_set: false,
            parent: dir.ino,
            name: name.to_vec(),
            links: Vec::new(),
            content: Content::None,
        }
    }

    /// Binds a new directory, symlink or special file at `name` in `parent`
    /// (host-local: never shared, never published).
    fn make_node(
        &self,
        parent: Ino,
        name: &[u8],
        kind: Kind,
        perm: u16,
        content: Content,
        caller: Caller,
    ) -> Result<Attr> {
        self.check_new_name(parent, name)?;
        if self.local_has(parent, name)? {
            return Err(Error::errno(libc::EEXIST));
        }
        self.check_space(0)?;
        let ino = self.alloc_ino()?;
        let _g = self.lock(&[parent]);
        if self.store.dentry(parent, name)?.is_some() {
            return Err(Error::errno(libc::EEXIST));
        }
        let mut dir = self.inode(parent)?;
        let mut txn = self.txn();
        let now = self.now();
        let mut inode = self.new_inode(ino, kind, Class::Local, perm, caller, &dir, name, now);
        inode.content = content;
        txn.batch.put_inode(&inode);
        txn.batch.put_dentry(parent, name, ino);
        if kind == Kind::Dir {
            dir.nlink += 1; // the new directory's ".."
        }
        self.touch_dir(&mut txn, dir, now);
        self.usage.remember(ino);
        if let Err(e) = self.commit(txn) {
            self.usage.forget(ino, 1);
            return Err(e);
        }
        Ok(self.attr_of(&inode))
    }

    pub fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, caller: Caller) -> Result<Attr> {
        let perm = (mode & 0o7777) as u16;
        self.make_node(parent, name, Kind::Dir, perm, Content::None, caller)
    }

    pub fn symlink(&self, parent: Ino, name: &[u8], target: &[u8], caller: Caller) -> Result<Attr> {
        if target.len() > SYMLINK_BYTES_MAX {
            return Err(Error::errno(libc::ENAMETOOLONG));
        }
        self.check_new_name(parent, name)?;
        if let Some(attr) = self.local_symlink(parent, name, target, caller)? {
            return Ok(attr);
        }
        let content = Content::Symlink(target.to_vec());
        self.make_node(parent, name, Kind::Symlink, 0o777, content, caller)
    }

    /// `mknod(2)`: fifos, Unix sockets and device nodes are host-local,
    /// metadata-only nodes (the kernel runs the pipe, the socket or the
    /// driver); `S_IFREG` makes an empty regular file of the name's class.
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            0 | libc::S_IFREG => return self.create_closed(parent, name, mode & 0o7777, caller),
            _ => return Err(Error::errno(libc::EINVAL)),
        };
        let rdev = match kind {
            Kind::CharDevice | Kind::BlockDevice => rdev,
            _ => 0,
        };
        let perm = (mode & 0o7777) as u16;
        self.make_node(parent, name, kind, perm, Content::Device(rdev), caller)
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: Ino, name: &[u8], dir_wanted: bool) -> Result<()> {
        if parent.is_virtual() || Self::is_stats_name(parent, name) {
            return Err(Error::errno(libc::EPERM));
        }
        self.writable()?;
        if name.len() > NAME_BYTES_MAX {
            return Err(Error::errno(libc::ENAMETOOLONG));
        }
        if !dir_wanted && self.local_unlink(parent, name)? {
            return Ok(());
        }
        if dir_wanted && self.local_has(parent, name)? {
            return Err(Error::errno(libc::ENOTDIR));
        }
        if !dir_wanted && self.unshow_remote_name(parent, name) {
            // Shown from its shared record only: nothing here to remove.
            return Ok(());
        }
        let (_g, found) = self.lock_names(&[], &[(parent, name)])?;
        let Some(ino) = found[0] else {
            return enoent();
        };
        let inode = self.inode(ino)?;
        match (inode.kind == Kind::Dir, dir_wanted) {
            (true, false) => return Err(Error::errno(libc::EISDIR)),
            (false, true) => return Err(Error::errno(libc::ENOTDIR)),
            (true, true) if !self.store.dir_is_empty(ino)? || !self.local_dir_clear(ino)? => {
                return Err(Error::errno(libc::ENOTEMPTY))
            }
            _ => {}
        }
        let mut txn = self.txn();
        if let Some(id) = Self::blob_of(&inode) {
            self.lock_blobs(&mut txn, &[id]);
        }
        let now = self.now();
        let mut dir = self.inode(parent)?;
        if inode.kind == Kind::Dir {
            dir.nlink -= 1; // its ".." goes
        }
        self.unbind(&mut txn, parent, name, inode)?;
        self.touch_dir(&mut txn, dir, now);
        self.commit(txn)
    }

    /// True if `existing` is a published result that a new binding of that
    /// name must leave in place.
    pub(super) fn is_published_result(existing: &Inode) -> bool {
        existing.kind == Kind::File
            && existing.class == Class::Result
            && matches!(existing.content, Content::Blob(_))
    }

    /// The first bytes of a file's content (for header-decided classes).
    pub(super) fn head_of(&self, inode: &Inode) -> [u8; 4] {
        let mut head = [0u8; 4];
        let file = match &inode.content {
            Content::Staged => self.blobs.open_staging(inode.ino, false).ok(),
            Content::Blob(id) => self.blobs.open_blob(id).ok(),
            _ => None,
        };
        if let Some(f) = file {
            let _ = std::os::unix::fs::FileExt::read_at(&f, &mut head, 0);
        }
        head
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        if parent.is_virtual() || newparent.is_virtual() || Self::is_stats_name(parent, name) {
            return Err(Error::errno(libc::EPERM));
        }
        if name.len() > NAME_BYTES_MAX {
            return Err(Error::errno(libc::ENAMETOOLONG));
        }
        self.check_new_name(newparent, newname)?;
        // A tree name moves in the tree, or is imported and moved below.
        let in_tree = self.local_has(parent, name)?;
        if in_tree && self.local_rename((parent, name), (newparent, newname), flags)? {
            return Ok(());
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(Error::errno(libc::EINVAL));
        }
        if self.local_has(newparent, newname)? {
            // A RocksDB name replacing a tree name (a shared file renamed
            // onto a local-class name, or onto a tree name whose directory
            // was renamed into a shared class).
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Error::errno(libc::EEXIST));
            }
            if self.store.dentry(parent, name)?.is_none() {
                return enoent();
            }
            self.local_unlink(newparent, newname)?;
        }
        // (The kernel moves its inode of the tree file to the new name; that
        // inode stands for the imported one while the kernel holds it.)
        self.rename_store(parent, name, newparent, newname, flags)
    }

    /// `rename` of a name RocksDB holds.
    fn rename_store(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.materialize_name(parent, name);
        for _ in 0..RETRIES_MAX {
            // Outside any lock: what is being moved, and the blob it will
            // publish (hashed, synced and linked into place).
            let Some(src_ino) = self.store.dentry(parent, name)? else {
                return enoent();
            };
            let Some(peek) = self.store.inode(src_ino)? else {
                continue;
            };
            let _dir_rename = (peek.kind == Kind::Dir)
                .then(|| Held::take(Level::DirRename, || self.dir_rename.lock().unwrap()));
            let class = if peek.kind == Kind::File {
                self.class_of(newparent, newname)?
            } else {
                peek.class
            };
            let publishes = class.is_blob() && peek.content == Content::Staged;
            let (prepared, sealed) = if publishes {
                let sealed = self.usage.begin_seal(src_ino);
                // A writer still holds it open: publish a snapshot copy.
                match self.prepare(src_ino, !sealed) {
                    Ok(p) => (Some(p), sealed),
                    Err(e) => {
                        if sealed {
                            self.end_seal(src_ino);
                        }
                        return Err(e);
                    }
                }
            } else {
                (None, false)
            };
            let head = match &prepared {
                Some(p) => p.head,
                None if peek.kind == Kind::File => self.head_of(&peek),
                None => [0; 4],
            };
            // A header-decided name already holding a result stays
            // create-only whatever the newcomer's header says.
            let header_decided = class == Class::CcacheEntry;
            let class = class.resolve(&head);
            let create_only = (class == Class::Result || header_decided) && peek.kind == Kind::File;
            let replaceable = if create_only {
                self.corrupt_result_at(newparent, newname, &peek, prepared.as_ref())
            } else {
                Ok(None)
            };
            let result = replaceable.and_then(|replaceable| {
                self.rename_locked(
                    (parent, name),
                    (newparent, newname),
                    flags,
                    &peek,
                    (class, create_only, replaceable),
                    prepared.as_ref(),
                )
            });
            if sealed {
                self.end_seal(src_ino);
            }
            match result {
                Ok(Some(sync)) => return if sync { self.sync_log() } else { Ok(()) },
                Ok(None) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::with_context(
            libc::EAGAIN,
            "rename: names kept changing",
        ))
    }

    /// The locked part of a rename. Returns None if `peek` (read without the
    /// lock) no longer describes the source, else whether to sync the log.
    /// `create_only`: a published result at the target is kept.
    /// `replaceable`: a result blob found corrupt (see `corrupt_result_at`)
    /// that the target may be replaced from, if it still holds it.
    fn rename_locked(
        &self,
        (parent, name): (Ino, &[u8]),
        (newparent, newname): (Ino, &[u8]),
        flags: u32,
        peek: &Inode,
        (class, create_only, replaceable): (Class, bool, Option<BlobId>),
        prepared: Option<&Prepared>,
    ) -> Result<Option<bool>> {
        let (_g, found) = self.lock_names(&[], &[(parent, name), (newparent, newname)])?;
        let Some(src_ino) = found[0] else {
            return enoent();
        };
        let mut src = self.inode(src_ino)?;
        if src_ino != peek.ino || src.content != peek.content {
            return Ok(None);
        }
        let dst = match found[1] {
            Some(d) => Some(self.inode(d)?),
            None => None,
        };
        if let Some(d) = &dst {
            if d.ino == src_ino {
                return Ok(Some(false));
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Error::errno(libc::EEXIST));
            }
            match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                (false, true) => return Err(Error::errno(libc::EISDIR)),
                (true, false) => return Err(Error::errno(libc::ENOTDIR)),
                (true, true)
                    if !self.store.dir_is_empty(d.ino)? || !self.local_dir_clear(d.ino)? =>
                {
                    return Err(Error::errno(libc::ENOTEMPTY))
                }
                _ => {}
            }
        }
        if src.kind == Kind::Dir {
            // Not into its own subtree (`dir_rename` keeps the tree still).
            let mut at = newparent;
            while at != Ino::ROOT {
                if at == src_ino {
                    return Err(Error::errno(libc::EINVAL));
                }
                at = self.inode(at)?.parent;
            }
        }

        let mut txn = self.txn();
        let mut ids: Vec<_> = [Self::blob_of(&src), dst.as_ref().and_then(Self::blob_of)]
            .into_iter()
            .flatten()
            .collect();
        ids.extend(prepared.map(|p| p.id));
        self.lock_blobs(&mut txn, &ids);
        let now = self.now();

        let dst_blob = dst.as_ref().and_then(Self::blob_of);
        let heals = replaceable.is_some() && dst_blob == replaceable;
        if create_only {
            if let Some(existing) = dst
                .as_ref()
                .filter(|d| Self::is_published_result(d) && !heals)
            {
                // Create-only: the existing result stays; the newcomer goes.
                Stats::bump(&self.stats.counters.conflicts);
                debug!(
                    "rename name={:?} ino={src_ino} outcome=kept-existing",
                    String::from_utf8_lossy(newname)
                );
                if let Some(p) = prepared {
                    self.discard_prepared(&mut txn, p)?;
                }
                if src.links.is_empty() {
                    txn.batch.delete_dentry(parent, name);
                    self.become_alias(&mut txn, src, existing)?;
                } else {
                    // Its other names keep it; only this one goes.
                    self.unbind(&mut txn, parent, name, src)?;
                }
                self.touch_dir(&mut txn, self.inode(parent)?, now);
                txn.after.push(After::Invalidate(Invalidate::Entry(
                    newparent,
                    newname.to_vec(),
                )));
                self.commit(txn)?;
                return Ok(Some(true));
            }
        }

        if let Some(p) = prepared {
            self.seal_into(&mut txn, &mut src, p, class)?;
        }
        if heals {
            Stats::bump(&self.stats.counters.corrupt_results_replaced);
            debug!(
                "rename name={:?} ino={src_ino} outcome=replaced-corrupt-result",
                String::from_utf8_lossy(newname)
            );
        }
        let replaced_dir = dst.as_ref().is_some_and(|d| d.kind == Kind::Dir);
        if let Some(d) = dst {
            self.unbind(&mut txn, newparent, newname, d)?;
        }
        txn.batch.delete_dentry(parent, name);
        txn.batch.put_dentry(newparent, newname, src_ino);
        src.move_name((parent, name), (newparent, newname));
        // A file with other names keeps the strongest class among them (a
        // result's other names stay create-only).
        src.class = if src.links.is_empty() {
            class
        } else {
            stronger(src.class, class)
        };
        src.ctime_ns = now;
        txn.batch.put_inode(&src);
        if src.kind == Kind::File {
            let view = Inode {
                parent: newparent,
                name: newname.to_vec(),
                ..src.clone()
            };
            self.share(&mut txn, &view)?;
        }
        // Directory link counts: a directory's ".." is a link to its parent.
        let moved_dir = src.kind == Kind::Dir;
        let mut new_dir = self.inode(newparent)?;
        if parent != newparent {
            let mut old_dir = self.inode(parent)?;
            if moved_dir {
                old_dir.nlink -= 1;
                new_dir.nlink += 1;
            }
            self.touch_dir(&mut txn, old_dir, now);
        }
        if replaced_dir {
            new_dir.nlink -= 1;
        }
        self.touch_dir(&mut txn, new_dir, now);
        self.commit(txn)?;
        Ok(Some(prepared.is_some()))
    }

    /// A hard link: another name of the same inode, in every class. A file
    /// whose names are in different classes takes the strongest (`stronger`):
    /// a result's other names stay create-only. A staged file that gets a
    /// shared name is published first (its bytes become a blob), unless a
    /// writer holds it open: then the new name gets a published copy (a new
    /// inode), since a write the writer was told succeeded cannot be made
    /// part of a result afterwards.
    pub fn link(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> Result<Attr> {
        self.link_name(ino, newparent, newname)
            .map(|a| self.shown(a))
    }

    fn link_name(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> Result<Attr> {
        Self::refuse_virtual(ino)?;
        self.check_new_name(newparent, newname)?;
        let mut ino = self.resolve(ino);
        if ino.is_local() {
            match self.local_link(ino, newparent, newname)? {
                Some(attr) => return Ok(attr),
                None => ino = self.resolve(ino),
            }
            if ino.is_local() {
                return enoent();
            }
        }
        if self.local_has(newparent, newname)? {
            return Err(Error::errno(libc::EEXIST));
        }
        self.materialize(ino)?;
        let peek = self.inode(ino)?;
        if peek.kind == Kind::Dir {
            return Err(Error::errno(libc::EPERM));
        }
        let class = if peek.kind == Kind::File {
            self.class_of(newparent, newname)?
        } else {
            Class::Local
        };
        let publishes = class != Class::Local && peek.content == Content::Staged;
        if !publishes {
            return self.link_same(ino, &peek, newparent, newname, class, None);
        }
        if !self.usage.begin_seal(ino) {
            return self.link_copy(ino, &peek, newparent, newname, class);
        }
        let result = self
            .prepare(ino, false)
            .and_then(|p| self.link_same(ino, &peek, newparent, newname, class, Some(&p)));
        self.end_seal(ino);
        result
    }

    /// `link` binding the inode itself; `prepared`: its staged bytes, to
    /// publish now (the caller holds the seal, so no writer changes them).
    fn link_same(
        &self,
        ino: Ino,
        peek: &Inode,
        newparent: Ino,
        newname: &[u8],
        class: Class,
        prepared: Option<&Prepared>,
    ) -> Result<Attr> {
        let head = match prepared {
            Some(p) => p.head,
            None => self.head_of(peek),
        };
        let class = class.resolve(&head);
        let (g, found) = self.lock_names(&[ino], &[(newparent, newname)])?;
        let mut src = self.inode(ino)?;
        if src.content != peek.content {
            return Err(Error::with_context(
                libc::EAGAIN,
                format!("link: ino={ino} changed while it was being linked"),
            ));
        }
        if src.nlink == 0 {
            return enoent(); // unlinked meanwhile, as on Linux
        }
        let mut txn = self.txn();
        if let Some(d) = found[0] {
            return self.link_onto_existing(txn, d, class, newname, prepared);
        }
        let now = self.now();
        if let Some(p) = prepared {
            self.lock_blobs(&mut txn, &[p.id]);
            let kept = src.class.resolve(&p.head);
            self.seal_into(&mut txn, &mut src, p, kept)?;
        }
        if src.kind == Kind::File {
            src.class = stronger(src.class, class);
        }
        src.nlink += 1;
        src.links.push((newparent, newname.to_vec()));
        src.ctime_ns = now;
        txn.batch.put_inode(&src);
        txn.batch.put_dentry(newparent, newname, ino);
        if class.is_blob() && src.kind == Kind::File {
            // Shared under the new name (the other names were shared when
            // they were bound, if their class is shared).
            let view = Inode {
                parent: newparent,
                name: newname.to_vec(),
                links: Vec::new(),
                ..src.clone()
            };
            self.share(&mut txn, &view)?;
        }
        self.touch_dir(&mut txn, self.inode(newparent)?, now);
        self.usage.remember(ino);
        self.commit(txn)?;
        drop(g);
        if prepared.is_some() || class.is_blob() {
            self.sync_log()?;
        }
        Ok(self.attr_of(&src))
    }

    /// A link onto an existing name: EEXIST, unless it is a result: then it
    /// stays, the newcomer is dropped (counted), and the call succeeds like
    /// the `link()`-based safe rename.
    fn link_onto_existing<'a>(
        &'a self,
        mut txn: Txn<'a>,
        existing: Ino,
        class: Class,
        newname: &[u8],
        prepared: Option<&Prepared>,
    ) -> Result<Attr> {
        let existing = self.inode(existing)?;
        if class != Class::Result || !Self::is_published_result(&existing) {
            return Err(Error::errno(libc::EEXIST));
        }
        Stats::bump(&self.stats.counters.conflicts);
        debug!(
            "link name={:?} outcome=kept-existing",
            String::from_utf8_lossy(newname)
        );
        if let Some(p) = prepared {
            self.lock_blobs(&mut txn, &[p.id]);
            self.discard_prepared(&mut txn, p)?;
            self.commit(txn)?;
        }
        self.usage.remember(existing.ino);
        Ok(self.attr_of(&existing))
    }

    /// `link` of a staged file a writer holds open into a shared class: the
    /// new name gets a new inode bound to a published copy of the bytes.
    fn link_copy(
        &self,
        ino: Ino,
        peek: &Inode,
        newparent: Ino,
        newname: &[u8],
        class: Class,
    ) -> Result<Attr> {
        let p = self.prepare(ino, true)?;
        let class = class.resolve(&p.head);
        let (g, found) = self.lock_names(&[ino], &[(newparent, newname)])?;
        let src = self.inode(ino)?;
        if src.content != peek.content {
            return Err(Error::with_context(
                libc::EAGAIN,
                format!("link: ino={ino} changed while it was being published"),
            ));
        }
        let mut txn = self.txn();
        if let Some(d) = found[0] {
            return self.link_onto_existing(txn, d, class, newname, Some(&p));
        }
        let newdir = self.inode(newparent)?;
        let now = self.now();
        self.lock_blobs(&mut txn, &[p.id]);
        self.adopt_prepared(&mut txn, &p)?;
        let new_ino = self.alloc_ino()?;
        let owner = Caller {
            uid: src.uid,
            gid: src.gid,
        };
        let mut inode = self.new_inode(
            new_ino,
            Kind::File,
            class,
            src.perm,
            owner,
            &newdir,
            newname,
            now,
        );
        inode.content = Content::Blob(p.id);
        inode.size = p.size;
        self.add_ref(&mut txn, p.id, new_ino, p.size);
        txn.batch.put_inode(&inode);
        txn.batch.put_dentry(newparent, newname, new_ino);
        self.share(&mut txn, &inode)?;
        self.touch_dir(&mut txn, newdir, now);
        self.usage.remember(new_ino);
        self.commit(txn)?;
        drop(g);
        self.sync_log()?;
        Ok(self.attr_of(&inode))
    }

    // ----- directories ---------------------------------------------------------

    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        let entries = self.list(ino)?;
        let fh = self.next_fh();
        self.dirs
            .with(&fh, |m| m.insert(fh, (std::sync::Arc::new(entries), false)));
        Ok(fh)
    }

    /// The entries of directory `ino`, with `.` (first) and `..`.
    fn list(&self, ino: Ino) -> Result<Vec<DirEntry>> {
        let mut entries = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: Ino::ROOT,
                kind: Kind::Dir,
                name: b"..".to_vec(),
            },
        ];
        if ino == Ino::STATS_DIR {
            self.list_virtual(&mut entries);
        } else {
            let dir = self.inode(ino)?;
            if dir.kind != Kind::Dir {
                return Err(Error::errno(libc::ENOTDIR));
            }
            entries[1].ino = dir.parent;
            if ino == Ino::ROOT {
                self.list_virtual_root(&mut entries);
            }
            for (name, child) in self.store.list_dir(ino, DIR_ENTRIES_MAX)? {
                if let Some(c) = self.store.inode(child)? {
                    entries.push(DirEntry {
                        ino: child,
                        kind: c.kind,
                        name,
                    });
                }
            }
            self.local_list(ino, &mut entries)?;
            // Names only the shared tier has (bounded, cached briefly).
            self.list_shared(ino, &mut entries)?;
        }
        Ok(entries)
    }

    /// The listing taken at opendir; the offset of entry i is i + 1.
    pub fn readdir(&self, fh: u64) -> Result<std::sync::Arc<Vec<DirEntry>>> {
        self.dirs
            .with(&fh, |m| m.get(&fh).map(|(l, _)| l.clone()))
            .ok_or_else(|| Error::errno(libc::EBADF))
    }

    /// The listing to read from `offset` on. Reading from offset 0 again
    /// (`rewinddir`) lists the directory afresh, as POSIX asks; reads at
    /// other offsets keep the listing stable.
    pub fn readdir_at(&self, fh: u64, offset: u64) -> Result<std::sync::Arc<Vec<DirEntry>>> {
        if offset != 0 {
            return self.readdir(fh);
        }
        let (listing, read_before) = self
            .dirs
            .with(&fh, |m| {
                m.get_mut(&fh)
                    .map(|(l, read)| (l.clone(), std::mem::replace(read, true)))
            })
            .ok_or_else(|| Error::errno(libc::EBADF))?;
        if !read_before {
            return Ok(listing);
        }
        let fresh = std::sync::Arc::new(self.list(listing[0].ino)?);
        self.dirs.with(&fh, |m| {
            if let Some((l, _)) = m.get_mut(&fh) {
                *l = fresh.clone();
            }
        });
        Ok(fresh)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.with(&fh, |m| m.remove(&fh));
    }
}

/// The class of a file with names in two classes: create-only wins over
/// replaceable, which wins over host-local.
fn stronger(a: Class, b: Class) -> Class {
    let rank = |c: Class| match c {
        Class::Result => 3,
        Class::CcacheEntry => 2,
        Class::Mutable => 1,
        Class::Local => 0,
    };
    if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}
