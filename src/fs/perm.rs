//! Permission checks: the ones the kernel's `default_permissions` would
//! make, made by the daemon from the attributes it holds.
//!
//! Why here: with `default_permissions` the kernel checks every path walk
//! against attributes it must hold fresh, and every change in a directory
//! makes them stale, so ccache's stats update (lock, create, rename, unlink
//! in one directory) cost a GETATTR per step. The daemon always has its
//! attributes at hand, so it checks at the request that needs the
//! permission, as the kernel would have just before sending it.
//!
//! Rules (POSIX, as `generic_permission`): uid 0 may read and write
//! anything and execute what has an x bit; otherwise the owner's, the
//! group's (primary or supplementary) or the others' bits decide, in that
//! order. Supplementary groups come from `/proc/PID/status`, read only when
//! the owner and primary group do not decide, and cached per process for
//! `GROUPS_CACHE_MS`. Root stands for the capabilities Linux would ask
//! for (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, `CAP_CHOWN`, `CAP_FSETID`): the
//! daemon sees only the caller's ids.

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::fs::{Core, SetAttr};
use crate::store::ids::Ino;
use crate::store::meta::Kind;

/// Read, write and search/execute, as in mode bits.
pub const MAY_READ: u32 = 4;
pub const MAY_WRITE: u32 = 2;
pub const MAY_EXEC: u32 = 1;
/// How long a process's supplementary groups are trusted.
const GROUPS_CACHE_MS: u64 = 1000;
/// Most processes whose groups are cached (per shard, then emptied).
const GROUPS_CACHED_MAX: usize = 4096;
/// Most supplementary groups read for one process.
const GROUPS_MAX: usize = 1024;

/// Who sends a request: the caller's ids and process.
#[derive(Clone, Copy, Debug)]
pub struct Who {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Supplementary groups of a process, from `/proc/PID/status`.
fn read_groups(pid: u32) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    text.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .take(GROUPS_MAX)
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Core {
    fn in_group(&self, who: &Who, gid: u32) -> bool {
        if who.gid == gid {
            return true;
        }
        let now_ms = crate::store::clock::wall_ns() / 1_000_000;
        let cached = self.groups.with(&(who.pid as u64), |m| {
            m.get(&(who.pid as u64))
                .filter(|(_, until)| *until > now_ms)
                .map(|(g, _)| g.contains(&gid))
        });
        if let Some(member) = cached {
            return member;
        }
        let groups = read_groups(who.pid);
        let member = groups.contains(&gid);
        self.groups.with(&(who.pid as u64), |m| {
            if m.len() >= GROUPS_CACHED_MAX {
                m.clear();
            }
            m.insert(who.pid as u64, (groups, now_ms + GROUPS_CACHE_MS));
        });
        self.stats
            .counters
            .group_lookups
            .fetch_add(1, Ordering::Relaxed);
        member
    }

    /// Checks that `who` may access `ino` as `mask` (MAY_* bits).
    pub fn permit(&self, who: &Who, ino: Ino, mask: u32) -> Result<()> {
        if who.uid == 0 && mask & MAY_EXEC == 0 {
            return Ok(()); // root reads and writes anything (no record read)
        }
        let a = self.getattr(ino)?;
        let perm = a.perm as u32;
        if who.uid == 0 {
            let exec_ok = mask & MAY_EXEC == 0 || a.kind == Kind::Dir || perm & 0o111 != 0;
            return if exec_ok {
                Ok(())
            } else {
                Err(Error::errno(libc::EACCES))
            };
        }
        let bits = if who.uid == a.uid {
            perm >> 6
        } else if self.in_group(who, a.gid) {
            perm >> 3
        } else {
            perm
        } & 7;
        if bits & mask == mask {
            Ok(())
        } else {
            Err(Error::errno(libc::EACCES))
        }
    }

    /// Checks that `who` may remove or replace `name` in `parent`: write and
    /// search on the directory, and in a sticky directory, own the entry or
    /// the directory.
    pub fn permit_remove(&self, who: &Who, parent: Ino, name: &[u8]) -> Result<()> {
        self.permit(who, parent, MAY_WRITE | MAY_EXEC)?;
        let dir = self.getattr(parent)?;
        if who.uid == 0 || dir.perm & 0o1000 == 0 || dir.uid == who.uid {
            return Ok(());
        }
        match self.child(parent, name)? {
            Some(child) if self.getattr(child)?.uid != who.uid => Err(Error::errno(libc::EPERM)),
            _ => Ok(()),
        }
    }

    /// Checks that `who` may rename `name` in `parent` to `newname` in
    /// `newparent`, as the kernel's `vfs_rename` would: remove the name
    /// from one directory and replace (or add) it in the other, and, for a
    /// directory that changes parent, write it (its `..` entry changes).
    pub fn permit_rename(
        &self,
        who: &Who,
        (parent, name): (Ino, &[u8]),
        (newparent, newname): (Ino, &[u8]),
    ) -> Result<()> {
        self.permit_remove(who, parent, name)?;
        self.permit_remove(who, newparent, newname)?;
        if parent != newparent && who.uid != 0 {
            if let Some(child) = self.child(parent, name)? {
                if self.getattr(child)?.kind == Kind::Dir {
                    self.permit(who, child, MAY_WRITE)?;
                }
            }
        }
        Ok(())
    }

    /// Checks a `setattr` as the kernel's `setattr_prepare` would, and
    /// adjusts it as Linux does (`set.mode` may lose `S_ISGID`).
    /// `writer`: it came through a handle opened for writing (`ftruncate`).
    ///
    /// - Only root gives a file away: a chown needs root, or the owner
    ///   naming their own uid; a chgrp needs root, or the owner naming the
    ///   file's group or a group of theirs.
    /// - A mode change needs the owner or root, except the kernel clearing
    ///   `S_ISUID`/`S_ISGID` when someone else writes, truncates or chowns
    ///   the file (without `handle_killpriv` FUSE sends that as a SETATTR of
    ///   the mode alone, as the caller): a mode that only drops those bits
    ///   is taken from anyone who may write the file, as Linux's
    ///   `ATTR_FORCE` does. Nobody else can set or keep a privilege bit.
    /// - The owner setting `S_ISGID` without being in the file's group (the
    ///   new one, if the same call changes it) loses the bit silently.
    /// - Explicit times need the owner; a touch to now needs the owner or
    ///   write permission; truncation needs write permission, which a
    ///   handle opened for writing already proved at its open.
    pub fn setattr_prepare(
        &self,
        who: &Who,
        ino: Ino,
        set: &mut SetAttr,
        writer: bool,
    ) -> Result<()> {
        if who.uid == 0 {
            return Ok(()); // CAP_CHOWN, CAP_FOWNER, CAP_FSETID
        }
        let a = self.getattr(ino)?;
        let owner = who.uid == a.uid;
        let may_write = || writer || self.permit(who, ino, MAY_WRITE).is_ok();
        if set.size.is_some() && !writer {
            self.permit(who, ino, MAY_WRITE)?;
        }
        if set.uid.is_some_and(|u| !(owner && u == a.uid)) {
            return Err(Error::errno(libc::EPERM));
        }
        if let Some(g) = set.gid {
            if !(owner && (g == a.gid || self.in_group(who, g))) {
                return Err(Error::errno(libc::EPERM));
            }
        }
        if let Some(mode) = set.mode {
            let (old, new) = (u32::from(a.perm) & 0o7777, mode & 0o7777);
            if owner {
                if new & 0o2000 != 0 && !self.in_group(who, set.gid.unwrap_or(a.gid)) {
                    set.mode = Some(mode & !0o2000);
                }
            } else {
                let drops_privileges_only = new != old && new | (old & 0o6000) == old;
                if !(drops_privileges_only && may_write()) {
                    return Err(Error::errno(libc::EPERM));
                }
            }
        }
        if set.sets_explicit_time() && !owner {
            return Err(Error::errno(libc::EPERM));
        }
        if set.touches() && !owner {
            self.permit(who, ino, MAY_WRITE)?;
        }
        Ok(())
    }
}
