//! Unit tests of the core without FUSE: a real store in a temporary
//! directory, driven through the same calls the adapter makes.

use super::*;
use crate::store::meta::open_store;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

static SEQ: AtomicUsize = AtomicUsize::new(0);

struct TempStore(PathBuf);

impl TempStore {
    fn new() -> TempStore {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("casfs-unit-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempStore(p)
    }
    fn core(&self) -> Core {
        self.core_with(100)
    }
    fn core_with(&self, verify_percent: u32) -> Core {
        self.start(verify_percent).unwrap()
    }
    fn start(&self, verify_percent: u32) -> Result<Core> {
        let store = open_store(&self.0).unwrap();
        Core::start(
            store,
            Config {
                rules: Rules::new(&[]).unwrap(),
                verify_percent,
                read_only: false,
                durable: true,
                root_uid: None,
                root_gid: None,
                root_mode: None,
            },
        )
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ME: Caller = Caller { uid: 0, gid: 0 };
const RESULT: &[u8] = b"c8aiq5frsd7ctaaepqbvl8shkb4kcjcR";

fn mkdirs(core: &Core) -> Ino {
    let a = core.mkdir(Ino::ROOT, b"a", 0o755, ME).unwrap().ino;
    core.mkdir(a, b"e", 0o755, ME).unwrap().ino
}

/// Writes `bytes` to a new temporary file in `dir`, closes it, returns its name.
fn write_tmp(core: &Core, dir: Ino, name: &str, bytes: &[u8]) -> Vec<u8> {
    let (_, fh) = core
        .create(dir, name.as_bytes(), 0o644, libc::O_EXCL, ME)
        .unwrap();
    core.write(fh, 0, bytes).unwrap();
    core.flush(fh).unwrap();
    core.release(fh).unwrap();
    name.as_bytes().to_vec()
}

fn read_name(core: &Core, dir: Ino, name: &[u8]) -> Result<Vec<u8>> {
    let ino = core.lookup(dir, name)?.ino;
    let (fh, _) = core.open(ino, libc::O_RDONLY)?;
    let data = core.read(fh, 0, 1 << 20);
    core.release(fh)?;
    data
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[test]
fn rename_onto_existing_result_keeps_first_writer() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let first = write_tmp(&core, d, "x.tmp.1.tmp", b"first");
    core.rename(d, &first, d, RESULT, 0).unwrap();
    let second = write_tmp(&core, d, "x.tmp.2.tmp", b"second");
    core.rename(d, &second, d, RESULT, 0).unwrap();
    assert_eq!(read_name(&core, d, RESULT).unwrap(), b"first");
    assert_eq!(core.lookup(d, &second).unwrap_err().code(), libc::ENOENT);
    assert_eq!(count(&core.stats.counters.conflicts), 1);
    assert_eq!(count(&core.stats.counters.publications), 1);
}

#[test]
fn link_onto_existing_result_succeeds_and_keeps_content() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let a = write_tmp(&core, d, "a.tmp", b"one");
    core.rename(d, &a, d, RESULT, 0).unwrap();
    let b = write_tmp(&core, d, "b.tmp", b"two");
    let b_ino = core.lookup(d, &b).unwrap().ino;
    core.link(b_ino, d, RESULT).unwrap();
    assert_eq!(read_name(&core, d, RESULT).unwrap(), b"one");
    assert_eq!(count(&core.stats.counters.conflicts), 1);
}

#[test]
fn rename_noreplace_refuses_existing_name() {
    let t = TempStore::new();
    let core = t.core();
    let a = write_tmp(&core, Ino::ROOT, "a.tmp", b"1");
    let b = write_tmp(&core, Ino::ROOT, "b.tmp", b"2");
    let e = core
        .rename(Ino::ROOT, &a, Ino::ROOT, &b, libc::RENAME_NOREPLACE)
        .unwrap_err();
    assert_eq!(e.code(), libc::EEXIST);
}

#[test]
fn identical_contents_are_stored_once() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    for (i, name) in [b"aaaaaaaaaaaaaaaaaaaaR".as_ref(), b"bbbbbbbbbbbbbbbbbbbbR"]
        .iter()
        .enumerate()
    {
        let tmp = write_tmp(&core, d, &format!("t{i}.tmp"), b"same bytes");
        core.rename(d, &tmp, d, name, 0).unwrap();
    }
    let g = core.gauges.get();
    assert_eq!(g.blobs, 1);
    assert_eq!(g.bytes_stored, 10);
    assert_eq!(g.bytes_logical, 20);
}

#[test]
fn manifest_rename_replaces_last_writer_wins() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let m = b"7akuu12pqg5l3n8scba4tpo4qcidrbgM";
    let mut replaced = Vec::new();
    for body in [b"v1".as_ref(), b"v2"] {
        let tmp = write_tmp(&core, d, "m.tmp", body);
        replaced.push(core.lookup(d, &tmp).unwrap().ino);
        core.rename(d, &tmp, d, m, 0).unwrap();
    }
    assert_eq!(read_name(&core, d, m).unwrap(), b"v2");
    assert_eq!(
        core.gauges.get().blobs,
        2,
        "the kernel still holds the old one"
    );
    core.forget(replaced[0], 2);
    assert_eq!(
        core.gauges.get().blobs,
        1,
        "freed once the kernel forgets it"
    );
}

#[test]
fn file_created_under_result_name_appears_only_at_close() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let (_, fh) = core.create(d, RESULT, 0o644, 0, ME).unwrap();
    core.write(fh, 0, b"partial").unwrap();
    assert_eq!(core.lookup(d, RESULT).unwrap_err().code(), libc::ENOENT);
    core.write(fh, 7, b" and whole").unwrap();
    core.flush(fh).unwrap();
    core.release(fh).unwrap();
    assert_eq!(read_name(&core, d, RESULT).unwrap(), b"partial and whole");
}

#[test]
fn open_file_keeps_its_bytes_after_unlink_and_replace() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let m = b"7akuu12pqg5l3n8scba4tpo4qcidrbgM";
    let tmp = write_tmp(&core, d, "m.tmp", b"old");
    core.rename(d, &tmp, d, m, 0).unwrap();
    let ino = core.lookup(d, m).unwrap().ino;
    let (fh, _) = core.open(ino, libc::O_RDONLY).unwrap();
    let tmp = write_tmp(&core, d, "m2.tmp", b"new");
    core.rename(d, &tmp, d, m, 0).unwrap();
    assert_eq!(core.read(fh, 0, 100).unwrap(), b"old");
    core.release(fh).unwrap();
    core.forget(ino, 1);
    assert_eq!(read_name(&core, d, m).unwrap(), b"new");
}

#[test]
fn posix_errors_are_the_expected_errno() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    assert_eq!(core.lookup(d, b"nope").unwrap_err().code(), libc::ENOENT);
    assert_eq!(
        core.mkdir(Ino::ROOT, b"a", 0o755, ME).unwrap_err().code(),
        libc::EEXIST
    );
    assert_eq!(
        core.rmdir(Ino::ROOT, b"a").unwrap_err().code(),
        libc::ENOTEMPTY
    );
    let long = vec![b'x'; 256];
    assert_eq!(
        core.create(d, &long, 0o644, 0, ME).unwrap_err().code(),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        core.lookup(d, &long).unwrap_err().code(),
        libc::ENAMETOOLONG
    );
    write_tmp(&core, d, "f.tmp", b"x");
    assert_eq!(
        core.create(d, b"f.tmp", 0o644, libc::O_EXCL, ME)
            .unwrap_err()
            .code(),
        libc::EEXIST
    );
    assert_eq!(
        core.unlink(Ino::ROOT, b"a").unwrap_err().code(),
        libc::EISDIR
    );
    assert_eq!(core.rmdir(d, b"f.tmp").unwrap_err().code(), libc::ENOTDIR);
    let f = core.lookup(d, b"f.tmp").unwrap().ino;
    assert_eq!(
        core.mkdir(f, b"x", 0o755, ME).unwrap_err().code(),
        libc::ENOTDIR
    );
    assert_eq!(
        core.mkdir(Ino::ROOT, b".casfs", 0o755, ME)
            .unwrap_err()
            .code(),
        libc::EEXIST
    );
}

#[test]
fn touches_never_move_mtime_backwards() {
    let t = TempStore::new();
    let core = t.core();
    let name = write_tmp(&core, Ino::ROOT, "x.alive", b"");
    let ino = core.lookup(Ino::ROOT, &name).unwrap().ino;
    let mut prev = core.getattr(ino).unwrap().mtime_ns;
    for _ in 0..100 {
        let now = core.setattr(ino, SetAttr::touch()).unwrap().mtime_ns;
        assert!(now > prev);
        prev = now;
    }
}

#[test]
fn a_touch_of_a_result_is_seen_at_once_and_written_in_a_batch() {
    let t = TempStore::new();
    let d;
    let touched;
    {
        let core = t.core();
        d = mkdirs(&core);
        let tmp = write_tmp(&core, d, "a.tmp", b"result bytes");
        core.rename(d, &tmp, d, RESULT, 0).unwrap();
        let ino = core.lookup(d, RESULT).unwrap().ino;
        let before = core.getattr(ino).unwrap().mtime_ns;
        touched = core.setattr(ino, SetAttr::touch()).unwrap().mtime_ns;
        assert!(touched > before);
        // Remembered, not written: the client reads its time at once.
        assert_eq!(core.store.touches.len(), 1);
        assert_eq!(core.getattr(ino).unwrap().mtime_ns, touched);
        assert_eq!(core.lookup(d, RESULT).unwrap().mtime_ns, touched);
        assert_eq!(core.write_touches().unwrap(), 1);
        assert!(core.store.touches.is_empty());
        assert_eq!(core.getattr(ino).unwrap().mtime_ns, touched);
        // Touched again and not written: a crash loses only this touch.
        core.setattr(ino, SetAttr::touch()).unwrap();
    }
    let core = t.core();
    assert_eq!(core.lookup(d, RESULT).unwrap().mtime_ns, touched);
}

#[test]
fn a_change_after_a_pending_touch_keeps_both_and_drops_the_touch() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let tmp = write_tmp(&core, d, "a.tmp", b"result bytes");
    core.rename(d, &tmp, d, RESULT, 0).unwrap();
    let ino = core.lookup(d, RESULT).unwrap().ino;
    let touched = core.setattr(ino, SetAttr::touch()).unwrap().mtime_ns;
    let chmod = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    let a = core.setattr(ino, chmod).unwrap();
    assert_eq!((a.perm, a.mtime_ns), (0o600, touched));
    // The chmod's record carried the touch; nothing is pending.
    assert!(core.store.touches.is_empty());
    drop(core);
    let core = t.core();
    let a = core.lookup(d, RESULT).unwrap();
    assert_eq!((a.perm, a.mtime_ns), (0o600, touched));
    // An unlink after a touch leaves nothing pending either.
    core.setattr(a.ino, SetAttr::touch()).unwrap();
    core.unlink(d, RESULT).unwrap();
    core.forget(a.ino, 1);
    assert!(core.store.touches.is_empty());
}

#[test]
fn entries_survive_a_restart_and_unpublished_files_do_not() {
    let t = TempStore::new();
    let d;
    {
        let core = t.core();
        d = mkdirs(&core);
        let tmp = write_tmp(&core, d, "a.tmp", b"kept");
        core.rename(d, &tmp, d, RESULT, 0).unwrap();
        // A file still being written under a result name when we "crash".
        let (_, fh) = core
            .create(d, b"zzzzzzzzzzzzzzzzzzzzzzzzR", 0o644, 0, ME)
            .unwrap();
        core.write(fh, 0, b"half").unwrap();
    }
    let core = t.core();
    assert_eq!(read_name(&core, d, RESULT).unwrap(), b"kept");
    assert_eq!(
        core.lookup(d, b"zzzzzzzzzzzzzzzzzzzzzzzzR")
            .unwrap_err()
            .code(),
        libc::ENOENT
    );
    assert_eq!(std::fs::read_dir(t.0.join("staging")).unwrap().count(), 0);
}

#[test]
fn corrupt_blob_is_never_served() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let tmp = write_tmp(&core, d, "a.tmp", b"good bytes");
    core.rename(d, &tmp, d, RESULT, 0).unwrap();
    let path = core.blobs.blob_path(&BlobId::of(b"good bytes"));
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&path, perms).unwrap();
    std::fs::write(&path, b"evil bytes").unwrap();
    assert_eq!(read_name(&core, d, RESULT).unwrap_err().code(), libc::EIO);
    assert_eq!(count(&core.stats.counters.corrupt_blobs), 1);
    // The name is gone: the next lookup is a miss, so the cache refills it.
    assert_eq!(core.lookup(d, RESULT).unwrap_err().code(), libc::ENOENT);
}

#[test]
fn ccache_4_13_entries_are_classed_by_header() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    // 4.13 names: 40 hex digits less the two of the level directories.
    let result_name = b"0123456789abcdef0123456789abcdef012345";
    let manifest_name = b"fedcba9876543210fedcba9876543210fedcba";
    for body in [&[0xcc, 0xac, 1, 0, b'a'][..], &[0xcc, 0xac, 1, 0, b'b']] {
        let tmp = write_tmp(&core, d, "r.tmp", body);
        core.rename(d, &tmp, d, result_name, 0).unwrap();
    }
    assert_eq!(
        read_name(&core, d, result_name).unwrap(),
        [0xcc, 0xac, 1, 0, b'a']
    );
    for body in [&[0xcc, 0xac, 1, 1, b'a'][..], &[0xcc, 0xac, 1, 1, b'b']] {
        let tmp = write_tmp(&core, d, "m.tmp", body);
        core.rename(d, &tmp, d, manifest_name, 0).unwrap();
    }
    assert_eq!(
        read_name(&core, d, manifest_name).unwrap(),
        [0xcc, 0xac, 1, 1, b'b']
    );
}

#[test]
fn stats_directory_is_read_only_and_only_at_root() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let s = core.lookup(Ino::ROOT, b".casfs").unwrap().ino;
    let f = core.lookup(s, b"stats.json").unwrap().ino;
    assert_eq!(
        core.open(f, libc::O_WRONLY).unwrap_err().code(),
        libc::EROFS
    );
    assert_eq!(
        core.create(s, b"x", 0o644, 0, ME).unwrap_err().code(),
        libc::EROFS
    );
    assert_eq!(core.lookup(d, b".casfs").unwrap_err().code(), libc::ENOENT);
    let (fh, direct) = core.open(f, libc::O_RDONLY).unwrap();
    assert!(direct);
    let text = String::from_utf8(core.read(fh, 0, 1 << 16).unwrap()).unwrap();
    assert!(text.contains("\"fuse_requests_total\":"));
}

#[test]
fn eviction_removes_least_recently_used_until_under_target() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let mut names = Vec::new();
    for i in 0..10u8 {
        let name = format!("{i:025}R").into_bytes();
        let tmp = write_tmp(&core, d, "t.tmp", &vec![i; 1000]);
        core.rename(d, &tmp, d, &name, 0).unwrap();
        names.push(name);
    }
    // Use the oldest one: it is now the most recently used.
    let first = core.lookup(d, &names[0]).unwrap().ino;
    core.setattr(first, SetAttr::touch()).unwrap();
    for n in &names {
        let ino = core.lookup(d, n).unwrap().ino;
        core.forget(ino, 2);
    }
    let evicted = core.evict(5000).unwrap();
    assert_eq!(evicted, 5);
    assert!(core.bytes_stored() <= 5000);
    assert!(core.lookup(d, &names[0]).is_ok(), "touched entry kept");
    for n in &names[1..6] {
        assert_eq!(core.lookup(d, n).unwrap_err().code(), libc::ENOENT);
    }
    assert_eq!(count(&core.stats.counters.evictions), 5);
}

#[test]
fn eviction_never_takes_an_open_file() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let tmp = write_tmp(&core, d, "t.tmp", b"held open");
    core.rename(d, &tmp, d, RESULT, 0).unwrap();
    let ino = core.lookup(d, RESULT).unwrap().ino;
    let (fh, _) = core.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(core.evict(0).unwrap(), 0);
    assert_eq!(core.read(fh, 0, 100).unwrap(), b"held open");
    core.release(fh).unwrap();
    assert_eq!(core.evict(0).unwrap(), 1);
}

#[test]
fn setgid_directory_hands_its_group_down_and_umask_is_the_callers() {
    let t = TempStore::new();
    let core = t.core();
    let shared = core.mkdir(Ino::ROOT, b"shared", 0o755, ME).unwrap().ino;
    core.setattr(
        shared,
        SetAttr {
            gid: Some(4242),
            mode: Some(0o2775),
            ..Default::default()
        },
    )
    .unwrap();
    let builder = Caller {
        uid: 1000,
        gid: 1000,
    };
    let sub = core.mkdir(shared, b"a", 0o775 & !0o002, builder).unwrap();
    assert_eq!(
        sub.gid, 4242,
        "new directory takes the setgid directory's group"
    );
    assert_eq!(sub.perm & 0o2000, 0o2000, "and keeps the setgid bit");
    assert_eq!(sub.perm & 0o777, 0o775);
    let (f, fh) = core.create(sub.ino, b"x.tmp", 0o664, 0, builder).unwrap();
    core.release(fh).unwrap();
    assert_eq!((f.uid, f.gid, f.perm), (1000, 4242, 0o664));
}

#[test]
fn a_blob_verified_once_is_not_hashed_again_on_open() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let tmp = write_tmp(&core, d, "a.tmp", b"verified once");
    core.rename(d, &tmp, d, RESULT, 0).unwrap();
    for _ in 0..3 {
        assert_eq!(read_name(&core, d, RESULT).unwrap(), b"verified once");
    }
    assert_eq!(count(&core.stats.counters.blobs_verified), 1);
    assert_eq!(count(&core.stats.counters.result_opens), 3);
}

const OTHER_RESULT: &[u8] = b"d8aiq5frsd7ctaaepqbvl8shkb4kcjcR";

/// Writes one byte of the blob file of `bytes` in place, as a stray tool
/// would (it moves the file's mtime and ctime).
fn flip_blob_byte(core: &Core, bytes: &[u8], at: usize) {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    let path = core.blobs.blob_path(&BlobId::of(bytes));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[bytes[at] ^ 1], at as u64).unwrap();
}

fn publish_as(core: &Core, d: Ino, name: &[u8], bytes: &[u8]) {
    let tmp = write_tmp(core, d, "p.tmp", bytes);
    core.rename(d, &tmp, d, name, 0).unwrap();
}

#[test]
fn a_blob_file_written_after_its_verified_open_is_hashed_again_and_not_served() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    publish_as(&core, d, RESULT, b"verified, then damaged");
    assert_eq!(
        read_name(&core, d, RESULT).unwrap(),
        b"verified, then damaged"
    );
    assert_eq!(count(&core.stats.counters.blobs_verified), 1);
    flip_blob_byte(&core, b"verified, then damaged", 3);
    assert_eq!(read_name(&core, d, RESULT).unwrap_err().code(), libc::EIO);
    assert_eq!(count(&core.stats.counters.blobs_verified), 2);
    assert_eq!(count(&core.stats.counters.corrupt_blobs), 1);
    assert_eq!(core.lookup(d, RESULT).unwrap_err().code(), libc::ENOENT);
}

#[test]
fn a_blob_file_touched_after_verification_is_hashed_again_outside_the_sample() {
    let t = TempStore::new();
    // A 1% sample: the first open is checked, the next 99 would not be.
    let core = t.core_with(1);
    let d = mkdirs(&core);
    publish_as(&core, d, RESULT, b"touched, not changed");
    read_name(&core, d, RESULT).unwrap();
    let path = core.blobs.blob_path(&BlobId::of(b"touched, not changed"));
    let f = std::fs::File::open(&path).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    assert_eq!(
        read_name(&core, d, RESULT).unwrap(),
        b"touched, not changed"
    );
    assert_eq!(count(&core.stats.counters.blobs_verified), 2);
    assert_eq!(
        read_name(&core, d, RESULT).unwrap(),
        b"touched, not changed"
    );
    assert_eq!(
        count(&core.stats.counters.blobs_verified),
        2,
        "unchanged since"
    );
    assert_eq!(count(&core.stats.counters.corrupt_blobs), 0);
}

#[test]
fn dedup_onto_a_damaged_blob_file_replaces_it_with_the_publications_bytes() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let bytes: &[u8] = b"published twice, damaged in between";
    publish_as(&core, d, RESULT, bytes);
    assert_eq!(read_name(&core, d, RESULT).unwrap(), bytes);
    flip_blob_byte(&core, bytes, 7);
    publish_as(&core, d, OTHER_RESULT, bytes);
    assert_eq!(count(&core.stats.counters.corrupt_blobs), 1);
    assert_eq!(read_name(&core, d, OTHER_RESULT).unwrap(), bytes);
    // The first name's blob file is the good one again.
    assert_eq!(read_name(&core, d, RESULT).unwrap(), bytes);
    let kept = std::fs::read(core.blobs.quarantine_path(&BlobId::of(bytes))).unwrap();
    assert_ne!(kept, bytes, "the damaged file is kept in quarantine");
    assert_eq!(kept.len(), bytes.len());
    assert_eq!(core.gauges.get().blobs, 1);
}

#[test]
fn dedup_onto_a_damaged_blob_file_by_a_losing_publication_still_heals_it() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let bytes: &[u8] = b"a result published again under its own name";
    publish_as(&core, d, RESULT, bytes);
    flip_blob_byte(&core, bytes, 0);
    // Create-only: the newcomer is discarded, but its bytes heal the file.
    publish_as(&core, d, RESULT, bytes);
    assert_eq!(count(&core.stats.counters.conflicts), 1);
    assert_eq!(count(&core.stats.counters.corrupt_blobs), 1);
    assert_eq!(read_name(&core, d, RESULT).unwrap(), bytes);
}

#[test]
fn dedup_onto_a_verified_unchanged_blob_does_not_hash_it_again() {
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    publish_as(&core, d, RESULT, b"dedup of a verified blob");
    read_name(&core, d, RESULT).unwrap();
    assert_eq!(count(&core.stats.counters.blobs_verified), 1);
    publish_as(&core, d, OTHER_RESULT, b"dedup of a verified blob");
    assert_eq!(count(&core.stats.counters.blobs_deduplicated), 1);
    assert_eq!(count(&core.stats.counters.blobs_verified), 1);
    // A dedup onto a blob never opened hashes it once; then it is trusted.
    let t2 = TempStore::new();
    let core = t2.core();
    let d = mkdirs(&core);
    publish_as(&core, d, RESULT, b"dedup of an unverified blob");
    publish_as(&core, d, OTHER_RESULT, b"dedup of an unverified blob");
    assert_eq!(count(&core.stats.counters.blobs_verified), 1);
    read_name(&core, d, RESULT).unwrap();
    read_name(&core, d, OTHER_RESULT).unwrap();
    assert_eq!(count(&core.stats.counters.blobs_verified), 1);
    assert_eq!(count(&core.stats.counters.corrupt_blobs), 0);
}

#[test]
fn gauges_are_kept_by_deltas_across_a_restart() {
    let t = TempStore::new();
    {
        let core = t.core();
        let d = mkdirs(&core);
        let tmp = write_tmp(&core, d, "a.tmp", b"12345");
        core.rename(d, &tmp, d, RESULT, 0).unwrap();
        let tmp = write_tmp(&core, d, "b.tmp", b"12345");
        core.rename(d, &tmp, d, b"bbbbbbbbbbbbbbbbbbbbR", 0)
            .unwrap();
        let tmp = write_tmp(&core, d, "c.tmp", b"123");
        core.rename(d, &tmp, d, b"ccccccccccccccccccccR", 0)
            .unwrap();
        core.unlink(d, b"ccccccccccccccccccccR").unwrap();
    }
    let core = t.core();
    let g = core.gauges.get();
    assert_eq!((g.blobs, g.bytes_stored, g.bytes_logical), (1, 5, 10));
    assert_eq!(core.store.gauges().unwrap().bytes_logical, 10);
}

#[test]
fn inode_numbers_are_never_reused_after_a_restart() {
    let t = TempStore::new();
    let first = {
        let core = t.core();
        core.mkdir(Ino::ROOT, b"one", 0o755, ME).unwrap().ino
    };
    let core = t.core();
    let second = core.mkdir(Ino::ROOT, b"two", 0o755, ME).unwrap().ino;
    assert!(second > first, "{second} after {first}");
}

/// Publications from many threads into different directories, and into
/// one name, with readers: every name ends with one whole content, and
/// the gauges match what is stored.
#[test]
fn concurrent_publications_converge_and_keep_gauges_exact() {
    let t = TempStore::new();
    let core = std::sync::Arc::new(t.core());
    let top = core.mkdir(Ino::ROOT, b"a", 0o755, ME).unwrap().ino;
    let dirs: Vec<Ino> = (0..4)
        .map(|i| {
            core.mkdir(top, format!("{i}").as_bytes(), 0o755, ME)
                .unwrap()
                .ino
        })
        .collect();
    let threads: Vec<_> = (0..8)
        .map(|w| {
            let core = core.clone();
            let dirs = dirs.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let d = dirs[(w + i) % dirs.len()];
                    let body = format!("writer {w} entry {i} {}", "x".repeat(i * 50));
                    let tmp = write_tmp(&core, d, &format!("w{w}-{i}.tmp"), body.as_bytes());
                    // Half the names are shared by all writers: create-only.
                    let name = if i % 2 == 0 {
                        format!("{i:020}sharedR")
                    } else {
                        format!("{w:010}{i:010}ownR")
                    };
                    core.rename(d, &tmp, d, name.as_bytes(), 0).unwrap();
                    let back = read_name(&core, d, name.as_bytes()).unwrap();
                    assert!(back.starts_with(b"writer "), "whole content");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let g = core.gauges.get();
    let mut stored = 0;
    let mut files = 0;
    for shard in std::fs::read_dir(t.0.join("blobs")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            stored += f.unwrap().metadata().unwrap().len();
            files += 1;
        }
    }
    assert_eq!(g.blobs, files);
    assert_eq!(g.bytes_stored, stored);
    drop(core);
    let report = crate::store::fsck::run(&t.0, false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn metrics_show_the_lock_wait_histogram() {
    let t = TempStore::new();
    let core = t.core();
    let text = String::from_utf8(core.render(Ino::STATS_METRICS)).unwrap();
    assert!(
        text.contains("# TYPE casfs_lock_wait_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("casfs_lock_wait_seconds_bucket{le=\"0.000001\"}"),
        "{text}"
    );
    let json = String::from_utf8(core.render(Ino::STATS_JSON)).unwrap();
    assert!(json.contains("\"lock_wait\":{\"count\":"), "{json}");
}

#[test]
fn damaged_metadata_records_are_eio_naming_fsck_and_fsck_repair_clears_them() {
    use crate::store::fsck;
    use crate::store::meta::Cf;
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let tmp = write_tmp(&core, d, "a.tmp", b"result bytes");
    core.rename(d, &tmp, d, RESULT, 0).unwrap();
    let tmp = write_tmp(&core, d, "b.tmp", b"other bytes");
    // A shared name (host-local files have no record to damage).
    let other = b"7akuu12pqg5l3n8scba4tpo4qcidrbgM".to_vec();
    core.rename(d, &tmp, d, &other, 0).unwrap();
    // The create's reference and this lookup's: once the kernel lets the
    // host-local number go, the name shows its own inode.
    let shown = core.lookup(d, &other).unwrap().ino;
    core.forget(shown, 2);
    let other_ino = core.lookup(d, &other).unwrap().ino;
    assert!(!other_ino.is_local());
    // A short directory entry value (which used to panic the FUSE worker
    // that read it) and a short inode record: EIO, saying what to run.
    core.store
        .put_raw(Cf::Dentries, &[&d.key()[..], RESULT].concat(), &[1, 2, 3]);
    core.store.put_raw(Cf::Inodes, &other_ino.key(), &[1, 2]);
    let e = core.lookup(d, RESULT).unwrap_err();
    assert_eq!(e.code(), libc::EIO, "{e}");
    assert!(e.to_string().contains("casfs fsck --store"), "{e}");
    assert_eq!(core.lookup(d, &other).unwrap_err().code(), libc::EIO);
    assert_eq!(core.getattr(other_ino).unwrap_err().code(), libc::EIO);
    drop(core);

    // A damaged clock lease or gauge is never taken as zero: the core does
    // not start, and says what to run.
    {
        let store = open_store(&t.0).unwrap();
        store.put_raw(Cf::Clock, b"lease_ns", &[7; 3]);
        store.put_raw(Cf::Counters, b"gauge_blobs", &[7; 3]);
    }
    let e = t
        .start(100)
        .err()
        .expect("a damaged clock lease stops the start");
    assert_eq!(e.code(), libc::EIO, "{e}");
    assert!(e.to_string().contains("casfs fsck --store"), "{e}");

    let report = fsck::run(&t.0, false).unwrap();
    assert!(report.problems.len() >= 4, "{:?}", report.problems);
    fsck::run(&t.0, true).unwrap();
    let report = fsck::run(&t.0, false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let core = t.core();
    assert_eq!(core.lookup(d, RESULT).unwrap_err().code(), libc::ENOENT);
    assert_eq!(core.lookup(d, &other).unwrap_err().code(), libc::ENOENT);
    assert!(core.store.gauges().is_ok(), "the gauges are recounted");
}

#[test]
fn a_time_set_on_a_scratch_file_survives_a_restart_and_its_rename_into_a_result() {
    const DATED_NS: u64 = 946_641_600_123_456_789;
    let dated = || SetAttr {
        mtime: Some(SetTime::At(DATED_NS)),
        ..SetAttr::default()
    };
    let t = TempStore::new();
    let d;
    {
        let core = t.core();
        d = mkdirs(&core);
        // Host-local scratch: kept across the restart, still staged.
        let tmp = write_tmp(&core, d, "dated.tmp", b"made in 1999");
        let ino = core.lookup(d, &tmp).unwrap().ino;
        core.setattr(ino, dated()).unwrap();
    }
    let core = t.core();
    core.rename(d, b"dated.tmp", d, RESULT, 0).unwrap();
    let published = core.lookup(d, RESULT).unwrap();
    assert_eq!(published.mtime_ns, DATED_NS, "kept by the publication");
    assert_eq!(read_name(&core, d, RESULT).unwrap(), b"made in 1999");

    // Written after its time was set: the close stamps the clock's now,
    // and the publication keeps that.
    let before_ns = core.getattr(d).unwrap().mtime_ns;
    let (attr, fh) = core.create(d, b"notes", 0o644, libc::O_EXCL, ME).unwrap();
    core.write(fh, 0, b"dated, ").unwrap();
    core.setattr(attr.ino, dated()).unwrap();
    core.write(fh, 7, b"then written").unwrap();
    core.flush(fh).unwrap();
    core.release(fh).unwrap();
    let notes = core.lookup(d, b"notes").unwrap();
    assert!(
        notes.mtime_ns > before_ns,
        "{} <= {before_ns}",
        notes.mtime_ns
    );
}

/// A store of `entries` results made by `populate` (256 directories).
fn populated(entries: u64) -> TempStore {
    let t = TempStore::new();
    let store = open_store(&t.0).unwrap();
    let core = Core::start(
        store,
        Config {
            rules: Rules::new(&[]).unwrap(),
            verify_percent: 0,
            read_only: false,
            durable: false,
            root_uid: None,
            root_gid: None,
            root_mode: None,
        },
    )
    .unwrap();
    core.populate(entries).unwrap();
    core.shutdown();
    t
}

#[test]
fn fsck_work_is_linear_in_the_store_size() {
    use crate::store::fsck::{run_with, Progress};
    // Operations (records read in order, records looked up, files listed,
    // files hashed), counted by fsck itself: each entry costs the same, so
    // equal steps in size cost equal steps in work, exactly.
    let work = |entries: u64| {
        let t = populated(entries);
        let r = run_with(&t.0, false, &mut Progress::quiet()).unwrap();
        assert!(
            r.problems.is_empty() && r.leftovers.is_empty(),
            "{:?} {:?}",
            r.problems,
            r.leftovers
        );
        assert_eq!(r.work.files_hashed, entries, "each blob is hashed once");
        r.work.operations()
    };
    let (w1, w2, w3) = (work(500), work(1000), work(1500));
    assert_eq!(
        w3 - w2,
        w2 - w1,
        "fsck's work must grow linearly: {w1}, {w2}, {w3} operations for 500, 1000, 1500 entries"
    );
    let per_entry = (w2 - w1) / 500;
    eprintln!("fsck work: {w1}, {w2}, {w3} operations; {per_entry} per entry");
    assert!(
        per_entry <= 12,
        "{per_entry} operations per entry: a constant, and a small one"
    );
}

/// Writes a blob file for `bytes` as a crash between link and commit
/// leaves it (no record names it).
fn plant_orphan(t: &TempStore, bytes: &[u8]) -> PathBuf {
    let id = BlobId::of(bytes);
    let path = Blobs::new(&t.0, false).blob_path(&id);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn the_orphan_sweep_never_takes_a_live_publications_file() {
    use crate::fs::publish::AFTER_PREPARE;
    use crate::store::meta::FileTime;
    let t = TempStore::new();
    let core = t.core();
    let d = mkdirs(&core);
    let any_time = FileTime(i64::MAX, 0);

    // Rule 1: a file linked after the daemon started is no candidate.
    let planted = plant_orphan(&t, b"linked after the start");
    assert_eq!(core.sweep_orphan_blobs().unwrap(), (0, 0));
    assert!(planted.exists());
    // Without rule 1 it is an orphan like any other.
    assert_eq!(core.sweep_orphan_blobs_before(any_time).unwrap(), (1, 22));
    assert!(!planted.exists());
    assert_eq!(count(&core.stats.counters.orphan_blobs_removed), 1);

    // A sweep between a publication's link and its commit, with rule 1
    // off: the file no record names yet goes, and the commit, under the
    // blob's stripe, links it again. Both for new bytes and for bytes an
    // orphan already held (the publication dedups onto that file).
    AFTER_PREPARE.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |core: &Core, id: &BlobId| {
            let (removed, _) = core.sweep_orphan_blobs_before(any_time).unwrap();
            assert_eq!(
                removed, 1,
                "the sweep took the unrecorded file of blob {id}"
            );
        }))
    });
    let tmp = write_tmp(&core, d, "a.tmp", b"raced bytes");
    core.rename(d, &tmp, d, RESULT, 0).unwrap();
    let orphan = plant_orphan(&t, b"bytes an orphan holds");
    let tmp = write_tmp(&core, d, "b.tmp", b"bytes an orphan holds");
    core.rename(d, &tmp, d, b"other000000000000000000000000R", 0)
        .unwrap();
    AFTER_PREPARE.with(|h| h.borrow_mut().take());
    assert!(orphan.exists(), "linked again by the commit");
    assert_eq!(read_name(&core, d, RESULT).unwrap(), b"raced bytes");
    assert_eq!(
        read_name(&core, d, b"other000000000000000000000000R").unwrap(),
        b"bytes an orphan holds"
    );
    assert_eq!(count(&core.stats.counters.corrupt_blobs), 0);
    // Rule 2: a file a record names is never taken.
    assert_eq!(core.sweep_orphan_blobs_before(any_time).unwrap(), (0, 0));
    drop(core);
    let r = crate::store::fsck::run(&t.0, false).unwrap();
    assert!(
        r.problems.is_empty() && r.leftovers.is_empty(),
        "{:?} {:?}",
        r.problems,
        r.leftovers
    );
}

#[test]
fn a_database_no_repair_can_read_is_moved_aside_and_the_store_starts_empty_keeping_its_files() {
    use crate::store::dbrepair::Outcome;
    use crate::store::fsck;
    let t = TempStore::new();
    let d;
    let blob;
    {
        let core = t.core();
        d = mkdirs(&core);
        let tmp = write_tmp(&core, d, "a.tmp", b"result bytes");
        core.rename(d, &tmp, d, RESULT, 0).unwrap();
        write_tmp(&core, d, "notes.tmp", b"a host-local file");
        blob = core.blobs.blob_path(&BlobId::of(b"result bytes"));
    }
    // Where the database was, a file: nothing RocksDB can open or repair.
    let meta = t.0.join("meta");
    std::fs::rename(&meta, t.0.join("meta-elsewhere")).unwrap();
    std::fs::write(&meta, b"not a database").unwrap();

    let e = open_store(&t.0)
        .err()
        .expect("a damaged store does not open");
    assert!(
        e.contains(&format!("casfs fsck --store {} --repair", t.0.display())),
        "{e}"
    );
    let r = fsck::run(&t.0, false).unwrap();
    assert!(r.database_unrepaired(), "reported, not repaired");
    assert!(
        r.database[0]
            .0
            .findings
            .iter()
            .any(|f| f.contains("not a directory")),
        "{:?}",
        r.database[0].0.findings
    );
    assert_eq!(
        std::fs::read(&meta).unwrap(),
        b"not a database",
        "unchanged"
    );

    let r = fsck::run(&t.0, true).unwrap();
    let repaired = r.database[0].1.as_ref().expect("repaired");
    assert_eq!(repaired.outcome, Outcome::Started, "{:?}", repaired.steps);
    let saved = repaired.saved.clone();
    assert_eq!(
        std::fs::read(saved.join("meta.after-repair-attempts")).unwrap(),
        b"not a database",
        "the old database is kept"
    );
    // The blob and the staging file no record names now are kept beside it.
    let name = blob.file_name().unwrap();
    let shard = blob.parent().unwrap().file_name().unwrap();
    assert!(saved.join("blobs").join(shard).join(name).exists());
    assert!(!blob.exists());
    // (Host-local files live in `local/`, beside the database: a store
    // that starts empty drops them with the directories that held them.)
    assert_eq!(r.moved_aside.0, 1, "the blob");
    let r = fsck::run(&t.0, false).unwrap();
    assert!(
        r.problems.is_empty() && r.leftovers.is_empty() && r.database.is_empty(),
        "{:?} {:?}",
        r.problems,
        r.leftovers
    );
    let core = t.core();
    assert_eq!(
        core.lookup(Ino::ROOT, b"a").unwrap_err().code(),
        libc::ENOENT
    );
    // The cache re-fills: the same bytes published again.
    let d = mkdirs(&core);
    let tmp = write_tmp(&core, d, "a.tmp", b"result bytes");
    core.rename(d, &tmp, d, RESULT, 0).unwrap();
    assert_eq!(read_name(&core, d, RESULT).unwrap(), b"result bytes");
}
