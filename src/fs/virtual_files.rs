//! The read-only statistics directory `.casfs/` at the mount root: its
//! names, attributes and rendered contents.
//!
//! Invariant: `.casfs` exists only at the root, and nothing in it can be
//! changed; its files are rendered at open, so a reader sees one snapshot.

use crate::error::{enoent, Result};
use crate::fs::{Attr, Core, DirEntry};
use crate::stats::{Extra, Snapshot};
use crate::store::ids::Ino;
use crate::store::meta::Kind;

/// The statistics directory's name at the mount root.
pub const STATS_DIR_NAME: &[u8] = b".casfs";
const STATS_FILES: [(&[u8], Ino); 4] = [
    (b"sync", Ino::STATS_SYNC),
    (b"stats", Ino::STATS_TEXT),
    (b"stats.json", Ino::STATS_JSON),
    (b"metrics", Ino::STATS_METRICS),
];
/// How long reading `.casfs/sync` waits for uploads at most.
const SYNC_WAIT_S: u64 = 300;

impl Core {
    pub(super) fn is_stats_name(parent: Ino, name: &[u8]) -> bool {
        parent == Ino::ROOT && name == STATS_DIR_NAME
    }

    /// The answer to a lookup of a virtual name, if it is one.
    pub(super) fn lookup_virtual(&self, parent: Ino, name: &[u8]) -> Option<Result<Attr>> {
        if Self::is_stats_name(parent, name) {
            return Some(Ok(self.virtual_attr(Ino::STATS_DIR)));
        }
        if parent == Ino::STATS_DIR {
            return Some(match STATS_FILES.iter().find(|(n, _)| *n == name) {
                Some((_, ino)) => Ok(self.virtual_attr(*ino)),
                None => enoent(),
            });
        }
        None
    }

    pub(super) fn list_virtual(&self, entries: &mut Vec<DirEntry>) {
        for (name, i) in STATS_FILES {
            entries.push(DirEntry {
                ino: i,
                kind: Kind::File,
                name: name.to_vec(),
            });
        }
    }

    pub(super) fn list_virtual_root(&self, entries: &mut Vec<DirEntry>) {
        entries.push(DirEntry {
            ino: Ino::STATS_DIR,
            kind: Kind::Dir,
            name: STATS_DIR_NAME.to_vec(),
        });
    }

    pub(super) fn virtual_attr(&self, ino: Ino) -> Attr {
        let (kind, perm, size) = if ino == Ino::STATS_DIR {
            (Kind::Dir, 0o555, 0)
        } else if ino == Ino::STATS_SYNC {
            (Kind::File, 0o444, 0)
        } else {
            (Kind::File, 0o444, self.render(ino).len() as u64)
        };
        let t = self.clock.last_ns();
        Attr {
            ino,
            kind,
            perm,
            uid: 0,
            gid: 0,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size,
            mtime_ns: t,
            atime_ns: t,
            ctime_ns: t,
            cacheable: false,
            rdev: 0,
        }
    }

    pub(super) fn render(&self, ino: Ino) -> Vec<u8> {
        if ino == Ino::STATS_SYNC {
            let text = match self.tier.get() {
                None => "ok: no shared tier\n".to_string(),
                Some(t) => match t.sync(std::time::Duration::from_secs(SYNC_WAIT_S)) {
                    Ok(n) => format!("ok: {n} uploads delivered to {}\n", t.describe()),
                    Err(e) => format!("FAILED: {e}\n"),
                },
            };
            return text.into_bytes();
        }
        let mut snap = Snapshot {
            gauges: self.gauges.get(),
            ..Default::default()
        };
        snap.extras.push(Extra {
            name: "touches_pending",
            help: "Touches (utimensat of published files) remembered and not yet written to the metadata",
            value: self.store.touches.len() as u64,
            gauge: true,
        });
        snap.histograms.push((
            "lock_wait",
            "Time spent waiting for a contended inode or blob lock",
            &self.stats.lock_wait,
        ));
        if let Some(t) = self.tier.get() {
            t.snapshot(&mut snap);
            snap.extras.push(Extra {
                name: "shared_clock_ahead",
                help: "Timestamps from the shared tier further ahead of this host's clock than --shared-clock-skew-ms (taken as the bound)",
                value: self.clock.ahead_count(),
                gauge: false,
            });
        }
        match ino {
            Ino::STATS_TEXT => self.stats.render_text(&snap),
            Ino::STATS_JSON => self.stats.render_json(&snap),
            _ => self.stats.render_prometheus(&snap),
        }
        .into_bytes()
    }
}
