//! Collection of the shared tier (issue 16), against every engine: the
//! directory engine on a real directory, Redis on a real `redis-server`
//! (started here on a loopback port), and the in-memory engine.
//!
//! What it proves: a pass brings a namespace within its budget, least
//! recently used first, and keeps what hosts reported using; damaged
//! records and unreferenced blobs go, blobs within their grace stay; one
//! collector per namespace holds the lease, and another takes it over
//! once its holder stopped renewing (died); a record republished while a
//! pass runs is kept; publishers and fetchers racing a collector only
//! ever miss, never read a wrong byte; a Redis of an unknown key layout
//! is refused.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use casfs::shared::dir::DirEngine;
use casfs::shared::gc::{collect, GcConfig, GcError};
use casfs::shared::mem::MemEngine;
use casfs::shared::redis::RedisEngine;
use casfs::shared::{
    now_s, Engine, EngineConfig, Lease, Record, RecordKind, RECORD_OVERHEAD_BYTES,
};
use casfs::store::ids::BlobId;

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn config() -> EngineConfig {
    EngineConfig {
        namespace: "default".into(),
        timeout: Duration::from_secs(5),
        umask: 0o022,
        password: None,
    }
}

enum Backend {
    Mem(MemEngine),
    Dir(PathBuf),
    Redis(common::Redis),
}

impl Backend {
    fn mem() -> Backend {
        Backend::Mem(MemEngine::new())
    }

    fn dir() -> Backend {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("casfs-gc-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        Backend::Dir(p)
    }

    fn redis() -> Backend {
        assert!(
            common::find_program("redis-cli").is_some(),
            "redis-cli is not installed (apt-get install redis-server redis-tools)"
        );
        Backend::Redis(common::Redis::start())
    }

    fn engine(&self) -> Box<dyn Engine> {
        match self {
            Backend::Mem(m) => Box::new(m.clone()),
            Backend::Dir(p) => Box::new(DirEngine::open(p, &config()).unwrap()),
            Backend::Redis(r) => Box::new(
                RedisEngine::open(&format!("redis://127.0.0.1:{}", r.port), &config()).unwrap(),
            ),
        }
    }

    /// Stores `bytes` as the record of `path`, as they are (damage).
    fn put_raw_record(&self, path: &str, bytes: &[u8]) {
        match self {
            Backend::Mem(m) => m.damage_record(path.as_bytes(), bytes),
            Backend::Dir(root) => {
                let h = blake3::hash(path.as_bytes()).to_hex();
                let f = root
                    .join("ns/default/records")
                    .join(&h[..2])
                    .join(h.as_str());
                fs::create_dir_all(f.parent().unwrap()).unwrap();
                fs::write(f, bytes).unwrap();
            }
            Backend::Redis(r) => {
                use std::os::unix::ffi::OsStrExt;
                let key = format!("casfs:default:r:{path}");
                let ok = Command::new("redis-cli")
                    .args(["-p", &r.port.to_string(), "SET", &key])
                    .arg(std::ffi::OsStr::from_bytes(bytes))
                    .status()
                    .unwrap()
                    .success();
                assert!(ok);
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Dir(p) = self {
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn blob_of(tag: &str, i: usize, len: usize) -> Vec<u8> {
    let mut v = format!("{tag}-{i}-").into_bytes();
    v.resize(len, (i % 251) as u8);
    v
}

fn file_record(bytes: &[u8]) -> Record {
    Record {
        kind: RecordKind::File {
            blob: BlobId::of(bytes),
            size: bytes.len() as u64,
            mode: 0o644,
        },
        mtime_ns: 1,
    }
}

fn publish(e: &dyn Engine, path: &str, bytes: &[u8]) {
    e.put_blob(&BlobId::of(bytes), bytes).unwrap();
    e.put_record(path.as_bytes(), &file_record(bytes), true)
        .unwrap();
}

fn blob_bytes(e: &dyn Engine) -> u64 {
    let mut total = 0;
    let mut cursor = Vec::new();
    loop {
        let page = e.scan_blobs(&cursor, 100).unwrap();
        total += page.items.iter().map(|b| b.bytes).sum::<u64>();
        match page.next {
            Some(n) => cursor = n,
            None => return total,
        }
    }
}

fn has(e: &dyn Engine, path: &str) -> bool {
    e.get_record(path.as_bytes()).unwrap().is_some()
}

/// Waits until the clock is in a new second (last-use times are seconds),
/// and a little more: file times come from the kernel's coarse clock, which
/// lags the one `now_s` reads by up to a tick (the directory engine's times
/// would otherwise fall in the second before).
fn next_second() {
    let s = now_s();
    while now_s() == s {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(COARSE_CLOCK_LAG_MS));
}

/// More than one kernel tick at any HZ (100 Hz: 10 ms).
const COARSE_CLOCK_LAG_MS: u64 = 30;

const ENTRY_BYTES: usize = 4000;

fn collection_brings_a_namespace_within_its_budget_least_recently_used_first(b: &Backend) {
    let e = b.engine();
    for i in 0..30 {
        publish(&*e, &format!("cc/old/{i}"), &blob_of("old", i, ENTRY_BYTES));
    }
    next_second();
    for i in 0..30 {
        publish(&*e, &format!("cc/new/{i}"), &blob_of("new", i, ENTRY_BYTES));
    }
    next_second();
    // Hosts report using ten of the old ones (hits served locally).
    let used: Vec<Vec<u8>> = (0..10)
        .map(|i| format!("cc/old/{i}").into_bytes())
        .collect();
    e.note_used(&used, now_s()).unwrap();
    let entry = ENTRY_BYTES as u64 + RECORD_OVERHEAD_BYTES;
    // 98 % of the budget (the low-water mark) is just over 40 entries.
    let budget = 41 * entry;
    let mut gc = GcConfig::new("default", budget);
    gc.blob_grace_s = 0;
    // As seen from two seconds on: every blob is past its (zero) grace.
    let report = collect(&*e, &gc, now_s() + 2).unwrap();
    assert_eq!(report.records_before, 60, "{report:?}");
    assert_eq!(report.records_removed, 20, "{report:?}");
    assert!(report.bytes_after <= budget, "{report:?}");
    assert_eq!(report.blobs_removed, 20, "{report:?}");
    for i in 0..30 {
        assert!(has(&*e, &format!("cc/new/{i}")), "new {i} was collected");
        assert_eq!(has(&*e, &format!("cc/old/{i}")), i < 10, "old {i}");
    }
    let on_engine = blob_bytes(&*e);
    assert_eq!(on_engine, 40 * ENTRY_BYTES as u64);
    assert_eq!(report.blob_bytes_after, Some(on_engine));
    // The collected names are gone from their listing.
    let listed = e.list(b"cc/old", 100).unwrap();
    assert_eq!(listed.len(), 10, "{listed:?}");
    // Under budget: a second pass removes nothing.
    let again = collect(&*e, &gc, now_s() + 2).unwrap();
    assert_eq!(again.records_removed + again.blobs_removed, 0, "{again:?}");
}

fn damaged_records_and_unreferenced_blobs_go_blobs_within_their_grace_stay(b: &Backend) {
    let e = b.engine();
    publish(&*e, "cc/a/kept", &blob_of("kept", 0, 100));
    b.put_raw_record("cc/a/damaged", b"casfs-record 1\nfile zz\n");
    // Over the bound a record may hold (Redis then reads that page a key
    // at a time).
    b.put_raw_record("cc/a/huge", &[b'x'; 5000]);
    let orphan = blob_of("orphan", 0, 300);
    e.put_blob(&BlobId::of(&orphan), &orphan).unwrap();
    let mut gc = GcConfig::new("default", 1 << 30);
    // Within the default grace (an hour) the orphan stays: it may be a
    // blob whose record is about to be put.
    let first = collect(&*e, &gc, now_s()).unwrap();
    assert_eq!(first.damaged_removed, 2, "{first:?}");
    assert_eq!(first.records_before, 1, "{first:?}");
    assert_eq!(first.blobs_removed, 0, "{first:?}");
    assert!(e.has_blob(&BlobId::of(&orphan)).unwrap());
    // A re-put renews its grace too; past it, the orphan goes.
    gc.blob_grace_s = 0;
    let second = collect(&*e, &gc, now_s() + 2).unwrap();
    assert_eq!(second.blobs_removed, 1, "{second:?}");
    assert_eq!(second.blob_bytes_removed, 300);
    assert!(!e.has_blob(&BlobId::of(&orphan)).unwrap());
    assert!(e.has_blob(&BlobId::of(&blob_of("kept", 0, 100))).unwrap());
    assert!(has(&*e, "cc/a/kept"));
}

fn one_collector_holds_the_lease_and_another_takes_it_over_when_the_holder_dies(b: &Backend) {
    let e = b.engine();
    let other = b.engine();
    let ttl_s = 2;
    assert!(matches!(
        e.lease("gc.default", "host-a", ttl_s, now_s()).unwrap(),
        Lease::Held { .. }
    ));
    match other.lease("gc.default", "host-b", ttl_s, now_s()).unwrap() {
        Lease::Other { holder, .. } => assert_eq!(holder, "host-a"),
        held => panic!("two holders at once: {held:?}"),
    }
    // A pass of B finds A collecting.
    let mut gc = GcConfig::new("default", 0);
    gc.holder = "host-b".into();
    assert!(matches!(
        collect(&*other, &gc, now_s()),
        Err(GcError::Leased { .. })
    ));
    // A renews while it works...
    assert!(matches!(
        e.lease("gc.default", "host-a", ttl_s, now_s()).unwrap(),
        Lease::Held { .. }
    ));
    // ...then dies (kill -9: no release, no renewal). Within its lease
    // (plus the clock's second) B takes over.
    std::thread::sleep(Duration::from_secs(ttl_s + 1));
    next_second();
    assert!(matches!(
        other.lease("gc.default", "host-b", ttl_s, now_s()).unwrap(),
        Lease::Held { .. }
    ));
    match e.lease("gc.default", "host-a", ttl_s, now_s()).unwrap() {
        Lease::Other { holder, .. } => assert_eq!(holder, "host-b"),
        held => panic!("the dead holder got it back: {held:?}"),
    }
    other.release_lease("gc.default", "host-b").unwrap();
    assert!(matches!(
        e.lease("gc.default", "host-a", ttl_s, now_s()).unwrap(),
        Lease::Held { .. }
    ));
}

fn a_record_republished_during_a_pass_is_kept(b: &Backend) {
    let e = b.engine();
    let v1 = blob_of("v1", 0, 50);
    publish(&*e, "cc/m/name", &v1);
    let page = e.scan_records("default", &[], 100).unwrap();
    let scanned = page
        .items
        .iter()
        .find(|s| s.record.is_some() && e.record_key(b"cc/m/name") == s.key)
        .cloned()
        .expect("the scan sees the record");
    let v2 = blob_of("v2", 0, 50);
    e.put_blob(&BlobId::of(&v2), &v2).unwrap();
    e.put_record(b"cc/m/name", &file_record(&v2), false)
        .unwrap();
    assert!(!e.delete_record(&scanned.key, &scanned.seen).unwrap());
    assert_eq!(e.get_record(b"cc/m/name").unwrap(), Some(file_record(&v2)));
}

/// Publishers put entries (blob, then record) and fetchers read them back
/// while a collector with a small budget runs pass after pass: every read
/// is the right bytes or a miss.
fn publishers_and_fetchers_racing_a_collector_only_ever_miss(b: &Backend) {
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let misses = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..2 {
        let e = b.engine();
        let stop = stop.clone();
        let published = published.clone();
        threads.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 400 {
                let bytes = blob_of(&format!("p{t}"), i, 2000);
                publish(&*e, &format!("cc/{t}/{i}"), &bytes);
                published.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for _ in 0..2 {
        let e = b.engine();
        let (stop, wrong, hits, misses) =
            (stop.clone(), wrong.clone(), hits.clone(), misses.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 7;
                let (t, i) = (n % 2, (n / 2) % 400);
                let path = format!("cc/{t}/{i}");
                let Ok(Some(r)) = e.get_record(path.as_bytes()) else {
                    misses.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let RecordKind::File { blob, size, .. } = r.kind else {
                    wrong.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                match e.get_blob(&blob, 1 << 20) {
                    Ok(Some(bytes)) => {
                        let right = blob_of(&format!("p{t}"), i, 2000);
                        if BlobId::of(&bytes) != blob || bytes != right || size != 2000 {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        } else {
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let e = b.engine();
    let entry = 2000 + RECORD_OVERHEAD_BYTES;
    let mut gc = GcConfig::new("default", 100 * entry);
    gc.blob_grace_s = 0;
    let mut passes = 0;
    while published.load(Ordering::Relaxed) < 800 || passes < 3 {
        collect(&*e, &gc, now_s() + 2).unwrap();
        passes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let last = collect(&*e, &gc, now_s() + 2).unwrap();
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "wrong bytes served");
    assert!(last.bytes_after <= 100 * entry, "{last:?}");
    assert!(
        hits.load(Ordering::Relaxed) + misses.load(Ordering::Relaxed) > 0,
        "the fetchers ran"
    );
}

macro_rules! for_every_engine {
    ($($case:ident),* $(,)?) => {
        mod dir_engine {
            $(#[test] fn $case() { super::$case(&super::Backend::dir()) })*
        }
        mod redis_engine {
            $(#[test] fn $case() { super::$case(&super::Backend::redis()) })*
        }
        mod mem_engine {
            $(#[test] fn $case() { super::$case(&super::Backend::mem()) })*
        }
    };
}

for_every_engine!(
    collection_brings_a_namespace_within_its_budget_least_recently_used_first,
    damaged_records_and_unreferenced_blobs_go_blobs_within_their_grace_stay,
    one_collector_holds_the_lease_and_another_takes_it_over_when_the_holder_dies,
    a_record_republished_during_a_pass_is_kept,
    publishers_and_fetchers_racing_a_collector_only_ever_miss,
);

#[test]
fn redis_of_an_unknown_key_layout_is_refused_at_open() {
    let r = common::Redis::start();
    let url = format!("redis://127.0.0.1:{}", r.port);
    drop(RedisEngine::open(&url, &config()).unwrap());
    let out = Command::new("redis-cli")
        .args(["-p", &r.port.to_string(), "GET", "casfs:format"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let ok = Command::new("redis-cli")
        .args(["-p", &r.port.to_string(), "SET", "casfs:format", "2"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let err = RedisEngine::open(&url, &config()).err().unwrap();
    assert!(err.contains("key layout"), "{err}");
}

#[test]
fn casfs_shared_gc_brings_a_shared_directory_within_its_budget() {
    let b = Backend::dir();
    let e = b.engine();
    for i in 0..20 {
        publish(&*e, &format!("cc/x/{i}"), &blob_of("cli", i, 10_000));
    }
    let Backend::Dir(root) = &b else {
        unreachable!()
    };
    let url = format!("file://{}", root.display());
    // 20 entries of about 10 KB: a budget of 100 KB keeps 9 of them.
    let out = common::casfs(&[
        "shared".as_ref(),
        "gc".as_ref(),
        "--shared".as_ref(),
        url.as_ref(),
        "--max-size".as_ref(),
        "100K".as_ref(),
        "--blob-grace-s".as_ref(),
        "0".as_ref(),
    ]);
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("least recently used records"), "{text}");
    let kept = (0..20).filter(|i| has(&*e, &format!("cc/x/{i}"))).count() as u64;
    assert!(
        kept * (10_000 + RECORD_OVERHEAD_BYTES) <= 100_000,
        "{kept} kept: {text}"
    );
    assert!(kept >= 8, "{kept} kept: {text}");
}

/// Real daemons: two hosts mounted with `--shared-gc-max-size` on one
/// shared directory; one collects (the namespace is brought under its
/// budget), and when it is killed with SIGKILL the other takes over
/// within the lease.
#[test]
fn mounted_daemons_collect_one_at_a_time_and_take_over_from_a_killed_collector() {
    let t = common::TestDir::new("gc-mounts");
    let shared = t.dir("shared");
    let url = format!("file://{}", shared.display());
    let args = [
        "--shared",
        url.as_str(),
        "--shared-gc-max-size",
        "100Ki",
        "--shared-gc-interval-s",
        "1",
        "--shared-gc-grace-s",
        "0",
        "--shared-gc-lease-s",
        "3",
    ];
    let mp_a = t.mountpoint("a");
    let mut a = common::Mount::start(&t.dir("store-a"), &mp_a, &args);
    let dir = mp_a.join("0/1");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..30 {
        let name = format!("{i:02}c8aiq5frsd7ctaaepqbvl8shkbR");
        common::publish(&dir, "t.tmp", &name, &common::pattern(i, 10_000));
    }
    let out = common::casfs(&["sync".as_ref(), mp_a.as_os_str()]);
    assert!(out.status.success(), "{}", common::output_text(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let budget = 100 * 1024;
    loop {
        let c = a.counters(&["shared_gc_passes", "shared_tier_bytes"]);
        if c["shared_gc_passes"] >= 1 && c["shared_tier_bytes"] <= budget {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no pass: {c:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mp_b = t.mountpoint("b");
    let b = common::Mount::start(&t.dir("store-b"), &mp_b, &args);
    // A holds the lease: B does not collect while A lives.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(b.counter("shared_gc_passes"), 0, "two collectors at once");
    a.kill9();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.counter("shared_gc_passes") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no takeover after the collector was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = DirEngine::open(&shared, &config()).unwrap();
    let bytes = blob_bytes(&e);
    assert!(bytes <= budget, "{bytes} blob bytes over the budget");
}
