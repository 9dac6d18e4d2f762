//! Real-mount tests with Debian's ccache and gcc: casfs works as `CCACHE_DIR`
//! (at the mount root and below it) for a parallel build of the C sources in
//! `tests/csrc/`. A cold build is all misses, a warm build all hits, every
//! object is byte-for-byte what plain gcc produces, `ccache -s` works through
//! the mount, the entries survive an unmount and remount, and the `.casfs/`
//! statistics files (text, JSON, Prometheus, `casfs stats`) agree with each
//! other and with what the builds did.

mod common;

use common::*;
use std::path::PathBuf;

const PARALLEL_JOBS: usize = 4;

/// A mounted store with a ccache directory `ccache_rel` below the mount root
/// (`""` for the root itself) and a plain-gcc reference build.
struct Setup {
    jobs: Vec<Job>,
    reference: PathBuf,
    ccache: Ccache,
    // Drop order: the mount goes before the directory that holds it.
    mount: Mount,
    td: TestDir,
}

impl Setup {
    fn new(tag: &str, ccache_rel: &str) -> Setup {
        let td = TestDir::new(tag);
        let jobs = jobs(&[0]);
        let reference = td.dir("gcc-objects");
        gcc_reference(&jobs, &reference);
        let mount = Mount::start(&td.store(), &td.mountpoint("mnt"), &[]);
        let dir = if ccache_rel.is_empty() {
            mount.mountpoint.clone()
        } else {
            let d = mount.mountpoint.join(ccache_rel);
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {d:?}: {e}"));
            d
        };
        let ccache = Ccache::new(&dir, &td.root);
        Setup {
            jobs,
            reference,
            ccache,
            mount,
            td,
        }
    }

    /// Zeroes ccache's counters, builds every job through ccache into a fresh
    /// directory, checks the objects against gcc's, and returns the counters.
    fn build(&self, label: &str) -> CcacheStats {
        self.ccache.zero_stats();
        let out = self.td.dir(&format!("objects-{label}"));
        let results = compile_all(Some(&self.ccache), &self.jobs, &out, PARALLEL_JOBS);
        assert_all_compiled(&results, &format!("{label} build through ccache on casfs"));
        assert_objects_identical(&self.jobs, &out, &self.reference, &format!("{label} build"));
        self.ccache.print_stats()
    }
}

fn assert_cold(stats: &CcacheStats, n: usize, where_: &str) {
    assert_eq!(
        (stats.misses(), stats.hits()),
        (n as u64, 0),
        "cold build ({where_}): expected {n} misses and 0 hits; ccache counters: {}",
        stats.summary()
    );
}

fn assert_warm(stats: &CcacheStats, n: usize, where_: &str) {
    assert_eq!(
        (stats.direct_hits(), stats.misses()),
        (n as u64, 0),
        "warm build ({where_}): expected {n} direct hits and 0 misses; ccache counters: {}",
        stats.summary()
    );
}

fn cold_then_warm(tag: &str, ccache_rel: &str) -> Setup {
    let s = Setup::new(tag, ccache_rel);
    let n = s.jobs.len();
    let where_ = format!("CCACHE_DIR={:?}", s.ccache.dir);
    let cold = s.build("cold");
    assert_cold(&cold, n, &where_);
    let warm = s.build("warm");
    assert_warm(&warm, n, &where_);
    s
}

#[test]
fn ccache_dir_at_mount_root_cold_misses_warm_hits_gcc_identical() {
    let s = cold_then_warm("ccroot", "");
    let text = s.ccache.run(&["-s"]);
    assert!(
        text.contains("Hits") && text.contains("Misses"),
        "`ccache -s` through the mount printed no hit/miss summary:\n{text}"
    );
    // ccache's own layout landed on the mount.
    let tag_dirs = std::fs::read_dir(&s.mount.mountpoint)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("CACHEDIR.TAG").is_file())
        .count();
    assert!(
        tag_dirs > 0,
        "no ccache level-1 directory with CACHEDIR.TAG on the mount root"
    );
}

#[test]
fn ccache_dir_below_mount_root_cold_misses_warm_hits_gcc_identical() {
    let s = cold_then_warm("ccsub", "builds/ccache");
    let text = s.ccache.run(&["-s"]);
    assert!(
        text.contains("Hits"),
        "`ccache -s` printed no summary:\n{text}"
    );
    assert!(
        !s.mount.mountpoint.join("builds/ccache/.casfs").exists(),
        ".casfs must exist only at the mount root"
    );
}

#[test]
fn statistics_files_agree_after_cold_and_warm_builds() {
    let s = cold_then_warm("ccstats", "");
    let m = &s.mount;
    let n = s.jobs.len() as u64;

    let json = m.stats_json();
    let keys = [
        "lookups",
        "result_opens",
        "misses",
        "publications",
        "conflicts",
        "blobs",
        "bytes_stored",
        "bytes_saved",
        "corrupt_blobs",
        "errors",
        "fuse_requests_total",
    ];
    let missing: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| json_u64(&json, k).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "stats.json lacks integer keys {missing:?}:\n{json}"
    );
    let get = |k: &str| json_u64(&json, k).unwrap();
    assert!(
        get("result_opens") >= n,
        "a warm build of {n} sources opened {n} results, but result_opens = {}:\n{json}",
        get("result_opens")
    );
    assert!(
        get("misses") > 0,
        "a cold build looks up absent entries, but misses = 0:\n{json}"
    );
    assert!(get("lookups") > 0, "lookups = 0 after two builds:\n{json}");
    assert!(
        get("publications") >= n,
        "a cold build of {n} sources publishes at least {n} results, but publications = {}:\n{json}",
        get("publications")
    );
    assert!(
        get("blobs") > 0 && get("bytes_stored") > 0,
        "nothing stored:\n{json}"
    );
    assert_eq!(
        get("corrupt_blobs"),
        0,
        "corrupt blobs after a clean build:\n{json}"
    );
    assert!(
        get("fuse_requests_total") > 0,
        "fuse_requests_total = 0:\n{json}"
    );

    // Per-operation counts sum to the total (retry: another request may land
    // between the two counters of one snapshot).
    let mut last = String::new();
    let consistent = (0..3).any(|_| {
        let j = m.stats_json();
        let ops = json_object_u64s(&j, "fuse_requests")
            .unwrap_or_else(|| panic!("stats.json has no object \"fuse_requests\":\n{j}"));
        let sum: u64 = ops.iter().map(|(_, v)| v).sum();
        let total = json_u64(&j, "fuse_requests_total").unwrap();
        last = format!("sum of fuse_requests = {sum}, fuse_requests_total = {total}\n{j}");
        assert!(
            ops.iter()
                .any(|(k, v)| k.to_ascii_lowercase().contains("lookup") && *v > 0),
            "fuse_requests counts no lookup:\n{j}"
        );
        sum == total
    });
    assert!(
        consistent,
        "fuse_requests does not add up to fuse_requests_total: {last}"
    );

    // Prometheus text agrees with the JSON (counters that reading the
    // statistics files does not move).
    let metrics = m.metrics();
    let json = m.stats_json();
    let parsed = parse_metrics(&metrics).unwrap_or_else(|bad| {
        panic!("metrics lines that are not `name value`: {bad:?}\n{metrics}")
    });
    assert!(
        parsed.keys().all(|k| k.starts_with("casfs_")),
        "every metric is named casfs_*:\n{metrics}"
    );
    // Every series carries the mount label.
    let label = format!("{{mount=\"{}\"", m.mountpoint.display());
    assert!(
        parsed.keys().all(|k| k.contains(&label)),
        "every series must carry {label}}}:\n{metrics}"
    );
    for k in ["result_opens", "misses", "publications", "conflicts"] {
        let name = format!("casfs_{k}_total{label}}}");
        let v = parsed
            .get(&name)
            .unwrap_or_else(|| panic!("metrics has no {name}:\n{metrics}"));
        assert_eq!(
            *v as u64,
            json_u64(&json, k).unwrap(),
            "{name} disagrees with stats.json {k:?}\nmetrics:\n{metrics}\njson:\n{json}"
        );
    }

    // `casfs stats MP` prints the text file. Counters of FUSE requests move
    // with every read, so compare the lines that stay the same across two
    // reads of the file taken before and after the command.
    let before = m.stats_text();
    let out = casfs(&["stats".as_ref(), m.mountpoint.as_os_str()]);
    let after = m.stats_text();
    assert!(
        out.status.success(),
        "casfs stats failed:\n{}",
        output_text(&out)
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        before.contains("result_opens"),
        ".casfs/stats does not mention result_opens:\n{before}"
    );
    let shape = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| {
                l.chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect::<String>()
            })
            .map(|l| collapse_hashes(&l))
            .collect()
    };
    assert_eq!(
        shape(&printed),
        shape(&before),
        "`casfs stats` output does not have the shape of .casfs/stats\n--- casfs stats:\n{printed}\n--- file:\n{before}"
    );
    let printed_lines: Vec<&str> = printed.lines().collect();
    let stable: Vec<&str> = before
        .lines()
        .filter(|l| after.lines().any(|a| a == *l))
        .collect();
    let differing: Vec<&&str> = stable
        .iter()
        .filter(|l| !printed_lines.contains(l))
        .collect();
    assert!(
        differing.is_empty(),
        "`casfs stats` disagrees with .casfs/stats on lines that did not change: {differing:?}\n--- casfs stats:\n{printed}\n--- file:\n{before}"
    );
}

fn collapse_hashes(l: &str) -> String {
    let mut out = String::new();
    for c in l.chars() {
        if !(c == '#' && out.ends_with('#')) {
            out.push(c);
        }
    }
    out
}

#[test]
fn remount_from_same_store_serves_every_entry_as_hit() {
    let mut s = Setup::new("ccremount", "");
    let n = s.jobs.len();
    let cold = s.build("cold");
    assert_cold(&cold, n, "first mount");
    s.mount.unmount();
    let store = s.mount.store.clone();
    let mp = s.mount.mountpoint.clone();
    s.mount = Mount::start(&store, &mp, &[]);
    let warm = s.build("after-remount");
    assert_warm(&warm, n, "after unmount and remount of the same store");
    let opens = s.mount.counter("result_opens");
    assert!(
        opens >= n as u64,
        "new daemon counted {opens} result opens for {n} ccache hits"
    );
}
