//! Every ccache generation's layout on a real mount, replayed with the file
//! operations that version performs (the project cannot build old ccache in
//! CI, so each sequence is written down from that version's sources and
//! replayed here with the same system calls), plus the real ccache installed
//! on the machine for the integrity check of results.
//!
//! - 2.4 (`ccache.c`): temporaries `tmp.{stdout,stderr}.<host>.<pid>` and
//!   `tmp.hash.<host>.<pid>.o` in the cache root (its default temp_dir),
//!   renamed to `<l1>/<l2>/<md4 hex>-<size>` and `….stderr`; stats rewritten
//!   in place under an fcntl lock.
//! - 3.7.12 (`ccache.c`, `util.c`, `manifest.c`, `stats.c`, `lockfile.c`):
//!   `create_tmp_fd` makes `<dest>.<host>.<pid>.XXXXXX` with mkstemp and
//!   `fchmod`s it, `copy_file` writes it and renames it onto `<hex>-<size>.o`,
//!   `.d`, …; the compiler's stderr goes to `<obj>.tmp.stderr.<host>.<pid>.XXXXXX`
//!   and is renamed onto `….stderr`; manifests `….manifest` through
//!   `<manifest>.tmp.<host>.<pid>.XXXXXX`; stats through a `symlink()` lock and
//!   `stats.tmp.<host>.<pid>.XXXXXX`; `x_unlink` renames to `.ccache.rm.tmp`
//!   first. A hit opens the manifest and the files and `utimes()` them.
//! - 4.0–4.6 (`AtomicFile.cpp`, `TemporaryFile.cpp`): `<dest>.tmp.XXXXXX`
//!   renamed onto `<base32hex>R` / `M`.
//! - 4.7–4.12: `<dest>.tmp.XXXXXX.tmp` (mkstemps), raw files `<name><n>W`,
//!   removal through `.ccache.tmp.unlink`.
//! - ≥ 4.13 (`localstorage.cpp`): plain hex `<l1>/<l2>/<38 hex>` (header
//!   decides), raw files `_<nn>`, migration `rename(<old>R, <hex>)`,
//!   moves between levels, removal through `.ccache.tmp.remove`.
//!
//! mkstemp's six random characters are chosen here (same `open(2)` flags,
//! `O_RDWR|O_CREAT|O_EXCL`, mode 0600) so that the case the old rules got
//! wrong, a temporary name ending like a result, is always exercised.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const HOST_PID: &str = "build7.4242";

fn mounted(tag: &str) -> (TestDir, Mount) {
    let td = TestDir::new(tag);
    let m = Mount::start(&td.store(), &td.mountpoint("mnt"), &[]);
    (td, m)
}

/// mkstemp(3)'s open: a new file, exclusive, mode 0600; then ccache's
/// `fchmod(fd, 0666 & ~umask)`.
fn mkstemp_like(path: &Path) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("mkstemp {path:?}: {e}"));
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("fchmod {path:?}: {e}"));
    f
}

/// `open(O_WRONLY|O_CREAT|O_TRUNC, 0666)`, as a compiler writes its output.
fn create_trunc(path: &Path) -> File {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o666)
        .open(path)
        .unwrap_or_else(|e| panic!("create {path:?}: {e}"))
}

fn rename(from: &Path, to: &Path) {
    fs::rename(from, to).unwrap_or_else(|e| panic!("rename {from:?} -> {to:?}: {e}"));
}

fn touch_now(p: &Path) {
    utimensat(p, None).unwrap_or_else(|e| panic!("utimes {p:?}: {e}"));
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {p:?}: {e}"))
}

/// A temporary created while still open must be visible to `stat` (a
/// host-local file), not hidden until closed like a result.
fn assert_visible_while_open(p: &Path, layout: &str) {
    assert!(
        fs::symlink_metadata(p).is_ok(),
        "{layout}: {p:?} is open for writing but stat() cannot see it: a temporary was \
         classed as a result (invisible until closed)"
    );
}

/// Writes `data` through a temporary made by `tmp_of(dest)` and renames it
/// onto `dest`, the way `copy_file(..., via_tmp_file)` / `AtomicFile` do.
fn store_via_tmp(tmp: &Path, dest: &Path, data: &[u8], layout: &str) {
    let mut f = mkstemp_like(tmp);
    assert_visible_while_open(tmp, layout);
    f.write_all(data).unwrap();
    drop(f);
    rename(tmp, dest);
}

/// A second, different publication under `dest` keeps the first content
/// and counts one conflict: the name is a create-only result.
fn assert_create_only(m: &Mount, tmp: &Path, dest: &Path, first: &[u8], layout: &str) {
    let before = m.counter("conflicts");
    store_via_tmp(tmp, dest, b"a different compiler's bytes", layout);
    assert!(
        read(dest) == first,
        "{layout}: a second rename onto {dest:?} replaced it: the name must be a create-only \
         result"
    );
    assert_eq!(
        m.counter("conflicts") - before,
        1,
        "{layout}: the discarded rename onto {dest:?} must count one conflict"
    );
}

/// A rename onto `dest` replaces it (last writer wins) without a conflict.
fn assert_replaced(m: &Mount, tmp: &Path, dest: &Path, layout: &str) {
    let before = m.counter("conflicts");
    let newer = b"a newer manifest".to_vec();
    store_via_tmp(tmp, dest, &newer, layout);
    assert_eq!(
        read(dest),
        newer,
        "{layout}: {dest:?} must be replaced (last writer wins)"
    );
    assert_eq!(
        m.counter("conflicts"),
        before,
        "{layout}: replacing {dest:?} is no conflict"
    );
}

/// Opening results read-only counts hits.
fn assert_hits(m: &Mount, before: u64, at_least: u64, layout: &str) {
    let got = m.counter("result_opens") - before;
    assert!(
        got >= at_least,
        "{layout}: the hit opened {at_least} results but casfs counted {got} hits: they are \
         not in the result class"
    );
}

// ---------------------------------------------------------------------------
// ccache 2.x
// ---------------------------------------------------------------------------

#[test]
fn ccache_2_4_results_are_create_only_and_hits_are_counted() {
    let layout = "ccache 2.4";
    let (_td, m) = mounted("layout2");
    let cache = m.mountpoint.join("cc2");
    // md4 hex + "-" + size; two levels (nlevels 2).
    let hash = "0123456789abcdef0123456789abcdef-5120";
    let dir = cache.join("0/1");
    fs::create_dir_all(&dir).unwrap();
    let hashname = dir.join(&hash[2..]);
    let path_stderr = dir.join(format!("{}.stderr", &hash[2..]));
    let tmp_stdout = cache.join(format!("tmp.stdout.{HOST_PID}"));
    let tmp_stderr = cache.join(format!("tmp.stderr.{HOST_PID}"));
    let tmp_hashname = cache.join(format!("tmp.hash.{HOST_PID}.o"));

    // Miss: execute() opens stdout/stderr O_CREAT|O_TRUNC|O_EXCL; the
    // compiler writes tmp.hash...o.
    let out = create_trunc(&tmp_stdout);
    let mut err = create_trunc(&tmp_stderr);
    let mut obj = create_trunc(&tmp_hashname);
    assert_visible_while_open(&tmp_hashname, layout);
    err.write_all(b"warning: unused variable\n").unwrap();
    let object = pattern(2, 5120);
    obj.write_all(&object).unwrap();
    drop((out, err, obj));
    fs::remove_file(&tmp_stdout).unwrap();
    fs::metadata(&tmp_stderr).unwrap();
    fs::metadata(&tmp_hashname).unwrap();
    rename(&tmp_hashname, &hashname);
    rename(&tmp_stderr, &path_stderr);
    // stats_update: open, fcntl-lock, read, rewrite in place.
    let stats = cache.join("0/stats");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&stats)
        .unwrap();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"0 0 0 0 1 0 0\n").unwrap();
    drop(f);
    assert_eq!(
        read(&stats),
        b"0 0 0 0 1 0 0\n",
        "{layout}: stats rewritten in place"
    );

    assert_create_only(
        &m,
        &cache.join(format!("tmp.hash.{HOST_PID}.o")),
        &hashname,
        &object,
        layout,
    );

    // Hit: open stderr, stat the object, touch, copy the object out.
    let hits = m.counter("result_opens");
    let e = File::open(&path_stderr).unwrap();
    fs::metadata(&hashname).unwrap();
    touch_now(&path_stderr);
    assert_eq!(read(&hashname), object);
    drop(e);
    assert_hits(&m, hits, 2, layout);
}

// ---------------------------------------------------------------------------
// ccache 3.x
// ---------------------------------------------------------------------------

#[test]
fn ccache_3_7_results_are_create_only_manifests_replaced_hits_counted() {
    let layout = "ccache 3.7.12";
    let (_td, m) = mounted("layout3");
    let cache = m.mountpoint.join("cc3");
    fs::create_dir_all(&cache).unwrap();
    let object_name = "fedcba9876543210fedcba9876543210-7008";
    let manifest_name = "00112233445566778899aabbccddeeff-1234";
    let obj_dir = cache.join("f/e");
    let cached = |suffix: &str| obj_dir.join(format!("{}{suffix}", &object_name[2..]));
    let (cached_obj, cached_stderr, cached_dep) = (cached(".o"), cached(".stderr"), cached(".d"));

    // to_cache(): create_tmp_fd("<obj>.tmp.stdout") fails with ENOENT,
    // create_parent_dirs, try again.
    let tmp_stdout = PathBuf::from(format!(
        "{}.tmp.stdout.{HOST_PID}.q1w2e3",
        cached_obj.display()
    ));
    assert!(OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp_stdout)
        .is_err());
    fs::create_dir_all(&obj_dir).unwrap();
    let stdout_f = mkstemp_like(&tmp_stdout);
    let tmp_stderr = PathBuf::from(format!(
        "{}.tmp.stderr.{HOST_PID}.a1b2c3",
        cached_obj.display()
    ));
    let mut stderr_f = mkstemp_like(&tmp_stderr);
    assert_visible_while_open(&tmp_stdout, layout);
    assert_visible_while_open(&tmp_stderr, layout);
    stderr_f.write_all(b"foo.c:1: warning: x\n").unwrap();
    drop((stdout_f, stderr_f));
    fs::metadata(&tmp_stdout).unwrap();
    fs::remove_file(&tmp_stdout).unwrap();
    // move_file_to_cache_same_fs (compression off): stat, rename, stat.
    assert!(fs::metadata(&cached_stderr).is_err());
    rename(&tmp_stderr, &cached_stderr);
    fs::metadata(&cached_stderr).unwrap();
    // copy_file_to_cache(.d) and put_file_in_cache(.o): copy_file via
    // create_tmp_fd("<dest>") = "<dest>.<host>.<pid>.XXXXXX", then rename.
    let dep = b"foo.o: foo.c foo.h\n".to_vec();
    let tmp_of = |dest: &Path, x: &str| PathBuf::from(format!("{}.{HOST_PID}.{x}", dest.display()));
    store_via_tmp(&tmp_of(&cached_dep, "Zz9ab3"), &cached_dep, &dep, layout);
    let object = pattern(3, 7008);
    store_via_tmp(&tmp_of(&cached_obj, "Zz9abc"), &cached_obj, &object, layout);
    // stats_update_size: symlink lock, stats.tmp.<host>.<pid>.XXXXXX, rename.
    let stats = cache.join("f/stats");
    let lock = cache.join("f/stats.lock");
    std::os::unix::fs::symlink("build7:4242:1700000000", &lock).unwrap();
    let stats_tmp = cache.join(format!("f/stats.tmp.{HOST_PID}.c0ffee"));
    store_via_tmp(&stats_tmp, &stats, b"0 0 0 0 1\n", layout);
    fs::remove_file(&lock).unwrap();
    fs::write(
        cache.join("f/CACHEDIR.TAG"),
        b"Signature: 8a477f597d28d172789f06886806bc55\n",
    )
    .unwrap();
    // update_manifest_file: manifest_put via "<manifest>.tmp" + create_tmp_fd.
    let man_dir = cache.join("0/0");
    fs::create_dir_all(&man_dir).unwrap();
    let manifest = man_dir.join(format!("{}.manifest", &manifest_name[2..]));
    let man_tmp = |x: &str| PathBuf::from(format!("{}.tmp.{HOST_PID}.{x}", manifest.display()));
    assert!(File::open(&manifest).is_err());
    store_via_tmp(&man_tmp("abc123"), &manifest, b"gzip manifest v1", layout);

    // A second compile of the same source (another chroot) stores again.
    assert_create_only(
        &m,
        &tmp_of(&cached_obj, "Yy8ab1"),
        &cached_obj,
        &object,
        layout,
    );
    assert_create_only(
        &m,
        &tmp_of(&cached_dep, "Yy8ab2"),
        &cached_dep,
        &dep,
        layout,
    );
    assert_replaced(&m, &man_tmp("def456"), &manifest, layout);

    // A direct-mode hit: read the manifest, stat and touch the files, copy
    // the object, the dependency file and stderr out.
    let hits = m.counter("result_opens");
    read(&manifest);
    fs::metadata(&cached_obj).unwrap();
    touch_now(&cached_obj);
    touch_now(&cached_stderr);
    assert_eq!(read(&cached_obj), object);
    assert_eq!(read(&cached_dep), dep);
    read(&cached_stderr);
    assert_hits(&m, hits, 3, layout);

    // --recache: x_unlink(cached_stderr) renames it to ".ccache.rm.tmp"
    // and unlinks that; a new stderr can then be stored under the name.
    let rm = PathBuf::from(format!("{}.ccache.rm.tmp", cached_stderr.display()));
    rename(&cached_stderr, &rm);
    fs::remove_file(&rm).unwrap();
    assert!(fs::metadata(&cached_stderr).is_err());
    store_via_tmp(
        &tmp_of(&cached_stderr, "Xx7ab1"),
        &cached_stderr,
        b"new warning\n",
        layout,
    );
    assert_eq!(read(&cached_stderr), b"new warning\n");
}

// ---------------------------------------------------------------------------
// ccache 4.0–4.12
// ---------------------------------------------------------------------------

#[test]
fn ccache_4_0_to_4_12_temporaries_are_local_results_create_only() {
    let (_td, m) = mounted("layout4");
    let dir = m.mountpoint.join("cc4/a/e");
    fs::create_dir_all(&dir).unwrap();
    let name = "c8aiq5frsd7ctaaepqbvl8shkb4kcjc";
    let result = dir.join(format!("{name}R"));
    let raw = dir.join(format!("{name}0W"));
    let manifest = dir.join(format!("{name}M"));
    // 4.0–4.6 AtomicFile: TemporaryFile(path + ".tmp") = "<path>.tmp.XXXXXX";
    // the six characters end like a result name.
    let layout = "ccache 4.0-4.6";
    let tmp46 = |p: &Path, x: &str| PathBuf::from(format!("{}.tmp.{x}", p.display()));
    let entry = pattern(40, 900);
    store_via_tmp(&tmp46(&result, "AbcdeR"), &result, &entry, layout);
    store_via_tmp(
        &tmp46(&manifest, "AbcdeM"),
        &manifest,
        b"manifest v1",
        layout,
    );
    assert_create_only(&m, &tmp46(&result, "Abcd1W"), &result, &entry, layout);
    assert_replaced(&m, &tmp46(&manifest, "Abcde1"), &manifest, layout);

    // 4.7–4.12: mkstemps "<path>.tmp.XXXXXX.tmp"; raw files "<name><n>W".
    let layout = "ccache 4.7-4.12";
    let tmp47 = |p: &Path, x: &str| PathBuf::from(format!("{}.tmp.{x}.tmp", p.display()));
    let object = pattern(41, 3000);
    store_via_tmp(&tmp47(&raw, "QwErtW"), &raw, &object, layout);
    assert_create_only(&m, &tmp47(&raw, "QwErtR"), &raw, &object, layout);
    assert_replaced(&m, &tmp47(&manifest, "QwErtM"), &manifest, layout);
    let hits = m.counter("result_opens");
    read(&manifest);
    assert_eq!(read(&result), entry);
    touch_now(&result);
    assert_eq!(read(&raw), object);
    assert_hits(&m, hits, 2, layout);
    // Util::unlink_safe: rename to ".ccache.tmp.unlink", then unlink.
    let gone = PathBuf::from(format!("{}.ccache.tmp.unlink", raw.display()));
    rename(&raw, &gone);
    fs::remove_file(&gone).unwrap();
    assert!(fs::metadata(&raw).is_err());
}

// ---------------------------------------------------------------------------
// ccache ≥ 4.13
// ---------------------------------------------------------------------------

/// A ccache entry in format version 1 (≥ 4.7): header, payload, then
/// XXH3-128 of everything before it, big-endian (high, low).
fn entry_v1(entry_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0xcc, 0xac, 1, entry_type, 0, 0, 1];
    v.extend_from_slice(&1_700_000_000u64.to_be_bytes());
    v.push(4);
    v.extend_from_slice(b"4.13");
    v.push(0);
    let size = (v.len() + 8 + payload.len() + 16) as u64;
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(payload);
    let sum = xxhash_rust::xxh3::xxh3_128(&v).to_be_bytes();
    v.extend_from_slice(&sum);
    v
}

/// `entry` with one payload byte flipped: the header still parses, the
/// checksum fails.
fn corrupted(entry: &[u8]) -> Vec<u8> {
    let mut v = entry.to_vec();
    let i = v.len() - 17;
    v[i] ^= 0x5a;
    v
}

const KEY: &str = "3f0a1b2c3d4e5f60718293a4b5c6d7e80a1b2c3d"; // 40 hex digits

#[test]
fn ccache_4_13_hex_layout_and_ordinary_hex_names_elsewhere() {
    let layout = "ccache 4.13";
    let (_td, m) = mounted("layout413");
    let cache = m.mountpoint.join("cc413");
    let l2 = cache.join("3/f");
    fs::create_dir_all(&l2).unwrap();
    let result = l2.join(&KEY[2..]);
    let tmp = |p: &Path, x: &str| PathBuf::from(format!("{}.tmp.{x}.tmp", p.display()));

    // Migration from the ≤ 4.12 layout: rename(<old>R, <hex>).
    let old = l2.join("c8aiq5frsd7ctaaepqbvl8shkb4kcjR");
    let entry = entry_v1(0, &pattern(413, 700));
    publish(&l2, "old.tmp", "c8aiq5frsd7ctaaepqbvl8shkb4kcjR", &entry);
    rename(&old, &result);
    assert_eq!(read(&result), entry);
    assert_create_only(&m, &tmp(&result, "aBc123"), &result, &entry, layout);

    // Manifest (header type 1) under another key: replaced.
    let manifest = l2.join("00112233445566778899aabbccddeeff001122");
    store_via_tmp(
        &tmp(&manifest, "aBc124"),
        &manifest,
        &entry_v1(1, b"m1"),
        layout,
    );
    let before = m.counter("conflicts");
    store_via_tmp(
        &tmp(&manifest, "aBc125"),
        &manifest,
        &entry_v1(1, b"m2"),
        layout,
    );
    assert_eq!(
        read(&manifest),
        entry_v1(1, b"m2"),
        "{layout}: manifests are replaced"
    );
    assert_eq!(m.counter("conflicts"), before);

    // Raw file "<hex>_00": a result.
    let raw = PathBuf::from(format!("{}_00", result.display()));
    let object = pattern(414, 2000);
    store_via_tmp(&tmp(&raw, "aBc126"), &raw, &object, layout);
    assert_create_only(&m, &tmp(&raw, "aBc127"), &raw, &object, layout);

    // move_to_wanted_cache_level: 3/f/<38> -> 3/f/0/<37>.
    let l3 = l2.join("0");
    fs::create_dir_all(&l3).unwrap();
    let deeper = l3.join(&KEY[3..]);
    rename(&result, &deeper);
    assert_eq!(read(&deeper), entry);
    assert_create_only(&m, &tmp(&deeper, "aBc128"), &deeper, &entry, layout);

    // Removal: rename to ".ccache.tmp.remove", then unlink.
    let gone = PathBuf::from(format!("{}.ccache.tmp.remove", deeper.display()));
    rename(&deeper, &gone);
    fs::remove_file(&gone).unwrap();
    assert!(fs::metadata(&deeper).is_err());

    // Hex-looking names outside a ccache layout are ordinary files: visible
    // while being written, rewritable in place.
    let src = m.mountpoint.join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    for rel in ["cafe.c", "add.a", "bad", "a/b/deadbeef", "a/b/beef-1.o"] {
        let p = src.join(rel);
        let mut f = create_trunc(&p);
        assert!(
            fs::symlink_metadata(&p).is_ok(),
            "{rel:?} outside a ccache layout is hidden while open: it was classed as a \
             ccache entry"
        );
        f.write_all(b"int x;\n").unwrap();
        drop(f);
        fs::write(&p, b"int y;\n").unwrap();
        assert_eq!(
            read(&p),
            b"int y;\n",
            "{rel:?} must be rewritable like any file"
        );
    }
}

// ---------------------------------------------------------------------------
// Integrity: the first *valid* content wins
// ---------------------------------------------------------------------------

#[test]
fn result_failing_its_checksum_is_replaced_by_a_valid_rename() {
    let (_td, m) = mounted("heal");
    let l2 = m.mountpoint.join("cc/3/f");
    fs::create_dir_all(&l2).unwrap();
    let name = &KEY[2..];
    let good = entry_v1(0, &pattern(8, 4000));
    let bad = corrupted(&good);
    publish(&l2, "bad.tmp", name, &bad);

    // A corrupt newcomer does not replace a corrupt result either.
    let c0 = m.counters(&["conflicts", "corrupt_results_replaced"]);
    publish(&l2, "bad2.tmp", name, &corrupted(&entry_v1(0, b"other")));
    assert_eq!(
        read(&l2.join(name)),
        bad,
        "a corrupt newcomer must not replace"
    );

    publish(&l2, "good.tmp", name, &good);
    assert!(
        read(&l2.join(name)) == good,
        "a result that fails its own XXH3-128 checksum must be replaced by a valid newcomer's \
         rename"
    );
    let c1 = m.counters(&["conflicts", "corrupt_results_replaced"]);
    assert_eq!(
        c1["corrupt_results_replaced"] - c0["corrupt_results_replaced"],
        1
    );
    assert_eq!(
        c1["conflicts"] - c0["conflicts"],
        1,
        "only the corrupt newcomer conflicted"
    );

    // Now valid: create-only again, for valid and corrupt newcomers alike.
    publish(
        &l2,
        "good2.tmp",
        name,
        &entry_v1(0, b"another valid result"),
    );
    publish(&l2, "bad3.tmp", name, &bad);
    assert!(
        read(&l2.join(name)) == good,
        "a valid result must keep its name"
    );
    let c2 = m.counters(&["conflicts", "corrupt_results_replaced"]);
    assert_eq!(
        c2["corrupt_results_replaced"],
        c1["corrupt_results_replaced"]
    );
    assert_eq!(c2["conflicts"] - c1["conflicts"], 2);

    // Writes into a published result stay discarded.
    let p = l2.join(name);
    if let Ok(mut f) = OpenOptions::new().write(true).open(&p) {
        let _ = f.write_all(b"garbage");
    }
    assert!(
        read(&p) == good,
        "a write into a published result must stay discarded"
    );
}

/// The real ccache (Debian's, 4.7.5 here): a result it finds corrupt is a
/// miss, and its recompile heals the entry, so the next run hits.
#[test]
fn real_ccache_recompile_heals_a_corrupt_result() {
    require_tools();
    let td = TestDir::new("healcc");
    let m = Mount::start(&td.store(), &td.mountpoint("mnt"), &[]);
    let cc = Ccache::new(&m.mountpoint, &td.root);
    let src = td.root.join("heal.c");
    fs::write(&src, "int heal(int x) { return x * 7; }\n").unwrap();
    let obj = td.root.join("heal.o");
    let compile = |label: &str| -> CcacheStats {
        cc.zero_stats();
        let out = cc
            .command()
            .args(["gcc", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{label}: ccache gcc failed:\n{}",
            output_text(&out)
        );
        cc.print_stats()
    };
    assert_eq!(compile("cold").misses(), 1);

    // The one result entry; corrupt a payload byte, keep the header. Names
    // are create-only, so replace it the way an operator (or another host)
    // could: unlink, then rename a corrupt copy onto the free name.
    let results = find_results(&m.mountpoint);
    assert_eq!(
        results.len(),
        1,
        "expected one result entry, found {results:?}"
    );
    let result = &results[0];
    let good = read(result);
    let bad = corrupted(&good);
    assert!(xxh3_verdict(&good), "ccache's entry must pass XXH3-128");
    fs::remove_file(result).unwrap();
    let dir = result.parent().unwrap();
    publish(
        dir,
        "corrupt.tmp",
        result.file_name().unwrap().to_str().unwrap(),
        &bad,
    );
    assert_eq!(read(result), bad);

    let replaced = m.counter("corrupt_results_replaced");
    let second = compile("corrupt");
    assert_eq!(
        second.misses(),
        1,
        "ccache must find the corrupt result and recompile: {}",
        second.summary()
    );
    assert!(
        xxh3_verdict(&read(result)),
        "after ccache recompiled, the result must hold valid bytes again (healed)"
    );
    assert_eq!(m.counter("corrupt_results_replaced") - replaced, 1);
    let third = compile("healed");
    assert_eq!(
        third.hits(),
        1,
        "after one recompile the healed result must hit: {}",
        third.summary()
    );
}

fn xxh3_verdict(entry: &[u8]) -> bool {
    let (body, sum) = entry.split_at(entry.len() - 16);
    xxhash_rust::xxh3::xxh3_128(body).to_be_bytes()[..] == *sum
}

/// Result entries (`…R` for ≤ 4.12, hex with a result header for ≥ 4.13).
fn find_results(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name == ".casfs" || name == "tmp" {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let head = fs::read(&p)
                    .map(|b| b.get(..4).map(<[u8]>::to_vec))
                    .ok()
                    .flatten();
                let hex = name.len() >= 32 && name.bytes().all(|c| c.is_ascii_hexdigit());
                if name.ends_with('R') || (hex && head.as_deref().map(|h| h[3]) == Some(0)) {
                    found.push(p);
                }
            }
        }
    }
    found
}

/// With a shared tier holding the corrupt result (create-only there too),
/// the healed local copy is not handed back the tier's corrupt winner.
#[test]
fn healed_result_is_not_reverted_to_a_corrupt_shared_winner() {
    let td = TestDir::new("healshared");
    let url = format!("file://{}", td.dir("nfs").display());
    let mp = td.mountpoint("mnt");
    let m = Mount::start(&td.store(), &mp, &["--shared", &url]);
    let l2 = mp.join("cc/3/f");
    fs::create_dir_all(&l2).unwrap();
    let name = &KEY[2..];
    let good = entry_v1(0, &pattern(9, 3000));
    let bad = corrupted(&good);
    publish(&l2, "bad.tmp", name, &bad);
    let sync = || {
        let out = casfs(&["sync".as_ref(), mp.as_os_str()]);
        assert!(
            out.status.success(),
            "casfs sync failed:\n{}",
            output_text(&out)
        );
    };
    sync();
    publish(&l2, "good.tmp", name, &good);
    assert_eq!(m.counter("corrupt_results_replaced"), 1);
    sync();
    assert!(
        read(&l2.join(name)) == good,
        "the healed result was replaced by the shared tier's corrupt copy"
    );
}
