//! `casfs fsck`: checks an unmounted store end to end and, with `--repair`,
//! makes it clean by dropping what is corrupt or dangling (for a cache,
//! dropping an entry is always a correct repair).
//!
//! What it checks: every blob against its hash and size, every blob file
//! against the metadata, every inode's content and names, every directory
//! entry, every blob reference, the clock lease and the store gauges.
//!
//! *Problems* (exit 1) are damage. *Leftovers* of a crash (files being
//! written, blobs linked but not yet committed, unowned staging files) are
//! expected after `kill -9`; they are reported, cleaned by the next mount
//! or by `--repair`, and do not make a store unclean.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use crate::decode::shown;
use crate::stats::StoreGauges;
use crate::store::blobs::Blobs;
use crate::store::clock::LEASE_NS;
use crate::store::ids::{BlobId, Ino};
use crate::store::meta::{
    blob_key_id, open_store, split_blob_ref_key, split_dentry_key, u64_value, Cf, Content, Inode,
    Kind, Store,
};

/// What fsck found.
#[derive(Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub leftovers: Vec<String>,
}

/// Everything the metadata says, loaded once.
struct Loaded {
    inodes: BTreeMap<Ino, Inode>,
    damaged_inodes: Vec<Ino>,
    dentries: Vec<(Ino, Vec<u8>, Ino)>,
    blobs: BTreeMap<BlobId, u64>,
    refs: BTreeSet<(BlobId, Ino)>,
    pending: BTreeSet<Ino>,
    /// Records whose key or value does not decode at all: what they are,
    /// dropped by a repair (what pointed at them is then judged as missing).
    damaged: Vec<(Cf, Vec<u8>, String)>,
}

fn load(store: &Store) -> crate::error::Result<Loaded> {
    let mut l = Loaded {
        inodes: BTreeMap::new(),
        damaged_inodes: Vec::new(),
        dentries: Vec::new(),
        blobs: BTreeMap::new(),
        refs: BTreeSet::new(),
        pending: BTreeSet::new(),
        damaged: Vec::new(),
    };
    let mut damaged = |cf: Cf, k: &[u8], what: &str, d: crate::decode::Damage| {
        let text = format!("{what} {}: does not decode ({d})", shown(k));
        l.damaged.push((cf, k.to_vec(), text));
    };
    store.scan(Cf::Inodes, |k, v| match Ino::from_key(k) {
        Ok(ino) => match Inode::decode(ino, v) {
            Ok(i) => {
                l.inodes.insert(ino, i);
            }
            Err(_) => l.damaged_inodes.push(ino),
        },
        Err(d) => damaged(Cf::Inodes, k, "inode record key", d),
    })?;
    store.scan(Cf::Dentries, |k, v| {
        match split_dentry_key(k).and_then(|(p, n)| Ok((p, n, Ino::from_key(v)?))) {
            Ok((parent, n, child)) => l.dentries.push((parent, n.to_vec(), child)),
            Err(d) => damaged(Cf::Dentries, k, "directory entry", d),
        }
    })?;
    store.scan(Cf::Blobs, |k, v| {
        match blob_key_id(k).and_then(|id| Ok((id, u64_value(v)?))) {
            Ok((id, size)) => {
                l.blobs.insert(id, size);
            }
            Err(d) => damaged(Cf::Blobs, k, "blob record", d),
        }
    })?;
    store.scan(Cf::BlobRefs, |k, _| match split_blob_ref_key(k) {
        Ok(r) => {
            l.refs.insert(r);
        }
        Err(d) => damaged(Cf::BlobRefs, k, "blob reference", d),
    })?;
    store.scan(Cf::Pending, |k, _| match Ino::from_key(k) {
        Ok(ino) => {
            l.pending.insert(ino);
        }
        Err(d) => damaged(Cf::Pending, k, "pending record key", d),
    })?;
    Ok(l)
}

fn name(n: &[u8]) -> String {
    String::from_utf8_lossy(n).into_owned()
}

/// Checks (and with `repair`, fixes) the store at `root`. Err means the
/// store could not be checked at all.
pub fn run(root: &Path, repair: bool) -> Result<Report, String> {
    if !root.join("casfs-store").exists() {
        return Err(format!(
            "{} is not a casfs store (no casfs-store file)",
            root.display()
        ));
    }
    let store = open_store(root)?;
    let blobs = Blobs::new(root, true);
    let l = load(&store).map_err(|e| e.to_string())?;
    let mut r = Report::default();
    let mut batch = store.batch();
    // Inodes to delete with every name pointing at them.
    let mut drop_inodes: BTreeSet<Ino> = BTreeSet::new();
    // Blobs to forget (and quarantine, when damaged).
    let mut drop_blobs: BTreeMap<BlobId, bool> = BTreeMap::new();

    for ino in &l.damaged_inodes {
        r.problems.push(format!("inode {ino}: record is damaged"));
        drop_inodes.insert(*ino);
    }
    for (cf, key, text) in &l.damaged {
        r.problems.push(text.clone());
        batch.delete_raw(*cf, key);
    }

    // Blobs: every one on record exists, has its size and hashes to its name.
    for (id, size) in &l.blobs {
        match fs::File::open(blobs.blob_path(id)) {
            Err(_) => {
                r.problems.push(format!("blob {id}: file is missing"));
                drop_blobs.insert(*id, false);
            }
            Ok(f) => match Blobs::hash_file(&f) {
                Ok(h) if h.id == *id && h.size == *size => {}
                Ok(h) if h.id == *id => {
                    r.problems.push(format!(
                        "blob {id}: recorded size {size}, file has {}",
                        h.size
                    ));
                    batch.put_blob(id, h.size);
                }
                Ok(_) => {
                    r.problems
                        .push(format!("blob {id}: bytes do not match the hash (corrupt)"));
                    drop_blobs.insert(*id, true);
                }
                Err(e) => {
                    r.problems.push(format!("blob {id}: cannot be read: {e}"));
                    drop_blobs.insert(*id, true);
                }
            },
        }
        if !l.refs.iter().any(|(b, _)| b == id) {
            r.leftovers.push(format!("blob {id}: no name refers to it"));
            drop_blobs.entry(*id).or_insert(false);
        }
    }

    // Blob files the metadata does not know (linked, then the daemon died
    // before it committed).
    for shard in fs::read_dir(root.join("blobs"))
        .map_err(|e| format!("cannot list blobs: {e}"))?
        .flatten()
    {
        for f in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            let fname = f.file_name().to_string_lossy().into_owned();
            let known = l.blobs.keys().any(|id| id.hex() == fname);
            if !known {
                r.leftovers
                    .push(format!("blob file {fname}: not in the metadata"));
                if repair {
                    let _ = fs::remove_file(f.path());
                }
            }
        }
    }

    // Inodes: content present and referenced; files and dirs have a name.
    let mut named: HashMap<Ino, u32> = HashMap::new();
    for (parent, n, child) in &l.dentries {
        let parent_ok = l.inodes.get(parent).is_some_and(|p| p.kind == Kind::Dir);
        if !parent_ok || !l.inodes.contains_key(child) || drop_inodes.contains(child) {
            r.problems.push(format!(
                "entry {:?} in directory {parent}: points at missing inode {child}",
                name(n)
            ));
            batch.delete_dentry(*parent, n);
            continue;
        }
        *named.entry(*child).or_default() += 1;
    }
    let mut max_time_ns = 0;
    for (ino, i) in &l.inodes {
        max_time_ns = max_time_ns.max(i.mtime_ns).max(i.ctime_ns);
        if l.pending.contains(ino) {
            continue; // a crash leftover, judged below
        }
        if *ino != Ino::ROOT && !named.contains_key(ino) {
            r.problems
                .push(format!("inode {ino} ({:?}): has no name", name(&i.name)));
            drop_inodes.insert(*ino);
        }
        match &i.content {
            Content::Blob(id) => {
                if !l.blobs.contains_key(id) {
                    r.problems.push(format!(
                        "inode {ino} ({:?}): its blob {id} is not stored",
                        name(&i.name)
                    ));
                    drop_inodes.insert(*ino);
                } else if !l.refs.contains(&(*id, *ino)) {
                    r.problems.push(format!(
                        "inode {ino} ({:?}): missing reference to blob {id}",
                        name(&i.name)
                    ));
                    batch.put_blob_ref(id, *ino);
                }
                if drop_blobs.contains_key(id) {
                    drop_inodes.insert(*ino);
                }
            }
            Content::Staged => {
                if !blobs.staging_path(*ino).exists() {
                    r.problems.push(format!(
                        "inode {ino} ({:?}): its staging file is missing",
                        name(&i.name)
                    ));
                    drop_inodes.insert(*ino);
                }
            }
            Content::None | Content::Symlink(_) | Content::Device(_) => {}
        }
    }
    for (id, ino) in &l.refs {
        let ok = l
            .inodes
            .get(ino)
            .is_some_and(|i| i.content == Content::Blob(*id));
        if !ok {
            r.problems
                .push(format!("blob {id}: stale reference from inode {ino}"));
            batch.delete_blob_ref(id, *ino);
        }
    }
    for ino in &l.pending {
        r.leftovers.push(format!(
            "inode {ino}: unfinished when the daemon stopped (dropped at next mount)"
        ));
    }
    for (fname, path) in blobs.staging_files() {
        let owned = fname
            .parse::<u64>()
            .ok()
            .and_then(|n| l.inodes.get(&Ino(n)))
            .is_some_and(|i| i.content == Content::Staged);
        if !owned {
            r.leftovers
                .push(format!("staging file {fname}: no inode owns it"));
            if repair {
                let _ = fs::remove_file(path);
            }
        }
    }

    // The clock never hands out a time at or below one already used.
    let lease = store.clock_lease();
    if lease.as_ref().map_or(true, |lease| *lease < max_time_ns) {
        r.problems.push(match lease {
            Ok(lease) => format!("clock lease {lease} is behind a recorded time {max_time_ns}"),
            Err(e) => e.to_string(),
        });
        if repair {
            store
                .put_clock_lease(max_time_ns + LEASE_NS)
                .map_err(|e| e.to_string())?;
        }
    }

    // Drop damaged inodes with their names and references.
    for ino in &drop_inodes {
        batch.delete_inode(*ino);
        batch.delete_pending(*ino);
        for (parent, n, child) in &l.dentries {
            if child == ino {
                batch.delete_dentry(*parent, n);
            }
        }
        for (id, i) in &l.refs {
            if i == ino {
                batch.delete_blob_ref(id, *ino);
            }
        }
    }
    for id in drop_blobs.keys() {
        batch.delete_blob(id);
    }

    // Gauges, as they will be after the repair.
    let kept_blobs: Vec<(&BlobId, &u64)> = l
        .blobs
        .iter()
        .filter(|(id, _)| !drop_blobs.contains_key(id))
        .collect();
    let expected = StoreGauges {
        blobs: kept_blobs.len() as u64,
        bytes_stored: kept_blobs.iter().map(|(_, s)| **s).sum(),
        bytes_logical: l
            .refs
            .iter()
            .filter(|(id, ino)| !drop_blobs.contains_key(id) && !drop_inodes.contains(ino))
            .filter_map(|(id, ino)| {
                l.inodes
                    .get(ino)
                    .filter(|i| i.content == Content::Blob(*id))
                    .map(|i| i.size)
            })
            .sum(),
    };
    let recorded = store.gauges().unwrap_or_else(|e| {
        // Recounted from nothing: the deltas below are the new values.
        r.problems.push(e.to_string());
        batch.reset_gauges();
        StoreGauges::default()
    });
    let gauges_off = recorded.blobs != expected.blobs
        || recorded.bytes_stored != expected.bytes_stored
        || recorded.bytes_logical != expected.bytes_logical;
    if gauges_off && r.problems.is_empty() && drop_blobs.is_empty() {
        r.problems.push(format!(
            "store counters say {recorded:?}, the store holds {expected:?}"
        ));
    }
    let delta = |want: u64, have: u64| want as i64 - have as i64;
    batch.add_gauges(
        delta(expected.blobs, recorded.blobs),
        delta(expected.bytes_stored, recorded.bytes_stored),
        delta(expected.bytes_logical, recorded.bytes_logical),
    );

    if repair {
        batch
            .commit(true)
            .map_err(|e| format!("cannot write repairs: {e}"))?;
        for (id, damaged) in &drop_blobs {
            if *damaged {
                blobs.quarantine(id);
            } else {
                blobs.remove_blob(id);
            }
        }
    }
    Ok(r)
}
