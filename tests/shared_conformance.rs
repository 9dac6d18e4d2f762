//! One conformance suite for the shared tier, run against every engine:
//! the directory engine on a real shared directory, Redis on a real
//! `redis-server` (started here on a loopback port, stopped at the end),
//! and the in-memory engine (with faults injected from a seed).
//!
//! Hosts are cores of the library (each with its own store), each with
//! its own engine handle on the one shared engine, as two build hosts
//! would be. Damage is injected the way operators, eviction policies and
//! disks do it: by writing into the engine's own storage (files, Redis
//! keys) or through the in-memory engine's hooks.
//!
//! What it proves (issue 9): uploads made during an outage cost no attempt,
//! survive a restart and are delivered (items 1, 2); `sync` fails once an
//! upload was given up (3); a fast host's clock moves others' by at most the
//! bound (12); damaged records are misses that
//! never trip the breaker; a record's size and mode are never trusted;
//! damaged create-only records are replaced by a verified newcomer; lost
//! directory records hide nothing; readdir lists the tier's names; mutable
//! entries are revalidated; a re-fetched name's mtime never goes back.
//! One test at the end repeats the kernel-facing ones on real mounts
//! (`ls`, `stat`, `read` through FUSE).

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use casfs::classes::Rules;
use casfs::fs::{Attr, Caller, Config, Core, SetAttr};
use casfs::shared::dir::DirEngine;
use casfs::shared::mem::MemEngine;
use casfs::shared::redis::RedisEngine;
use casfs::shared::tier::{LostRace, Outbox, Tier, TierConfig};
use casfs::shared::{Engine, EngineConfig, Record, RecordKind};
use casfs::store::ids::{BlobId, Ino};
use casfs::store::meta::open_store;

static SEQ: AtomicUsize = AtomicUsize::new(0);
const ME: Caller = Caller { uid: 0, gid: 0 };
/// How far the tier may move a host's clock past wall time (the daemon's
/// default).
const CLOCK_AHEAD_MAX_NS: u64 = 1_000_000_000;
/// Generous bound for things that happen in the background (hang detection).
const WAIT_S: u64 = 60;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "casfs-conformance-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        namespace: "default".into(),
        timeout: Duration::from_secs(5),
        umask: 0o022,
        password: None,
    }
}

// ---------------------------------------------------------------------------
// Engines, and how each is damaged from outside
// ---------------------------------------------------------------------------

trait Backend {
    /// A new handle on the one shared engine (one per host).
    fn engine(&self) -> Box<dyn Engine>;
    /// Stores `bytes` as the record of `path`, as they are.
    fn put_raw_record(&self, path: &str, bytes: &[u8]);
    /// Makes `path`'s record something that is not a record.
    fn put_wrong_type(&self, path: &str);
    fn drop_dir_records(&self);
    fn drop_listings(&self);
    fn drop_blob(&self, id: &BlobId);
    fn corrupt_blob(&self, id: &BlobId);
    /// An outage (`true`) or its end: the engine's path gone, its server
    /// stopped, or every call failing.
    fn set_down(&self, down: bool);
    /// Adds a round trip's latency to every call, where the engine can
    /// (the in-memory one; the others are on loopback or a local disk).
    fn set_latency(&self, _latency: Duration) {}
    /// A hung engine (`true`: every call waits, nothing fails) or its end.
    fn stall(&self, _stalled: bool) {
        panic!("this engine cannot be stalled from a test");
    }
}

struct DirBackend {
    root: TempDir,
}

impl DirBackend {
    fn new() -> DirBackend {
        DirBackend {
            root: TempDir::new("shared-dir"),
        }
    }
    fn ns(&self) -> PathBuf {
        self.root.0.join("ns/default")
    }
    fn record_file(&self, path: &str) -> PathBuf {
        let h = blake3::hash(path.as_bytes()).to_hex();
        self.ns().join("records").join(&h[..2]).join(h.as_str())
    }
    fn blob_file(&self, id: &BlobId) -> PathBuf {
        let hex = id.hex();
        self.root.0.join("blobs").join(&hex[..2]).join(&hex)
    }
}

impl Backend for DirBackend {
    fn engine(&self) -> Box<dyn Engine> {
        Box::new(DirEngine::open(&self.root.0, &engine_config()).unwrap())
    }
    fn put_raw_record(&self, path: &str, bytes: &[u8]) {
        let f = self.record_file(path);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        let _ = fs::remove_file(&f);
        let _ = fs::remove_dir_all(&f);
        fs::write(&f, bytes).unwrap();
    }
    fn put_wrong_type(&self, path: &str) {
        let f = self.record_file(path);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        let _ = fs::remove_file(&f);
        fs::create_dir_all(&f).unwrap();
    }
    fn drop_dir_records(&self) {
        for shard in fs::read_dir(self.ns().join("records")).unwrap() {
            for f in fs::read_dir(shard.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                let is_dir = fs::read(&p)
                    .ok()
                    .and_then(|b| Record::decode(&b).ok())
                    .is_some_and(|r| r.kind == RecordKind::Dir);
                if is_dir {
                    fs::remove_file(&p).unwrap();
                }
            }
        }
    }
    fn drop_listings(&self) {
        let lists = self.ns().join("lists");
        fs::remove_dir_all(&lists).unwrap();
        fs::create_dir(&lists).unwrap();
    }
    fn drop_blob(&self, id: &BlobId) {
        fs::remove_file(self.blob_file(id)).unwrap();
    }
    fn set_down(&self, down: bool) {
        let away = self.root.0.with_extension("away");
        if down {
            fs::rename(&self.root.0, &away).unwrap();
        } else {
            fs::rename(&away, &self.root.0).unwrap();
        }
    }
    fn corrupt_blob(&self, id: &BlobId) {
        let p = self.blob_file(id);
        let mut b = fs::read(&p).unwrap();
        b[0] ^= 0x55;
        fs::write(&p, b).unwrap();
    }
}

/// A `redis-server` on a free loopback port (`common::Redis`), stopped on
/// drop, damaged with `redis-cli`.
struct RedisBackend {
    redis: std::sync::Mutex<common::Redis>,
    port: u16,
}

impl RedisBackend {
    fn new() -> RedisBackend {
        assert!(
            common::find_program("redis-cli").is_some(),
            "redis-cli is not installed: the conformance suite needs it to damage Redis \
             (apt-get install redis-server redis-tools)"
        );
        let redis = common::Redis::start();
        RedisBackend {
            port: redis.port,
            redis: std::sync::Mutex::new(redis),
        }
    }

    fn cli(&self, args: &[&[u8]]) -> String {
        use std::os::unix::ffi::OsStrExt;
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args.iter().map(|a| std::ffi::OsStr::from_bytes(a)))
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn eval(&self, script: &str, keys: &[&str]) {
        let n = keys.len().to_string();
        let mut args: Vec<&[u8]> = vec![b"EVAL", script.as_bytes(), n.as_bytes()];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        let out = self.cli(&args);
        assert!(!out.contains("ERR"), "EVAL failed: {out}");
    }
}

impl Backend for RedisBackend {
    fn engine(&self) -> Box<dyn Engine> {
        let url = format!("redis://127.0.0.1:{}", self.port);
        Box::new(RedisEngine::open(&url, &engine_config()).unwrap())
    }
    fn put_raw_record(&self, path: &str, bytes: &[u8]) {
        let key = format!("casfs:default:r:{path}");
        self.cli(&[b"DEL", key.as_bytes()]);
        self.cli(&[b"SET", key.as_bytes(), bytes]);
    }
    fn put_wrong_type(&self, path: &str) {
        let key = format!("casfs:default:r:{path}");
        self.cli(&[b"DEL", key.as_bytes()]);
        self.cli(&[b"SADD", key.as_bytes(), b"not-a-record"]);
    }
    fn drop_dir_records(&self) {
        self.eval(
            "for _, k in ipairs(redis.call('KEYS', 'casfs:default:r:*')) do \
               if redis.call('TYPE', k).ok == 'string' and \
                  string.sub(redis.call('GET', k), 1, 19) == 'casfs-record 1\\ndir ' then \
                 redis.call('DEL', k) end end",
            &[],
        );
    }
    fn drop_listings(&self) {
        self.eval(
            "for _, k in ipairs(redis.call('KEYS', 'casfs:default:l:*')) do redis.call('DEL', k) end",
            &[],
        );
    }
    fn drop_blob(&self, id: &BlobId) {
        self.cli(&[b"DEL", format!("casfs:b:{}", id.hex()).as_bytes()]);
    }
    /// Stops the server (its data goes with it: no persistence) or starts
    /// a new one on the same port.
    fn set_down(&self, down: bool) {
        let mut r = self.redis.lock().unwrap();
        if down {
            r.stop();
        } else {
            r.restart();
        }
    }
    /// SIGSTOP: the server keeps its connections and answers nothing.
    fn stall(&self, stalled: bool) {
        let r = self.redis.lock().unwrap();
        r.signal(if stalled {
            libc::SIGSTOP
        } else {
            libc::SIGCONT
        });
    }
    fn corrupt_blob(&self, id: &BlobId) {
        self.eval(
            "local v = redis.call('GET', KEYS[1]) \
             redis.call('SETRANGE', KEYS[1], 0, string.char((string.byte(v, 1) + 1) % 256))",
            &[&format!("casfs:b:{}", id.hex())],
        );
    }
}

struct MemBackend(MemEngine);

impl Backend for MemBackend {
    fn engine(&self) -> Box<dyn Engine> {
        Box::new(self.0.clone())
    }
    fn put_raw_record(&self, path: &str, bytes: &[u8]) {
        self.0.damage_record(path.as_bytes(), bytes);
    }
    fn put_wrong_type(&self, path: &str) {
        self.0.damage_record_type(path.as_bytes());
    }
    fn drop_dir_records(&self) {
        self.0.drop_dir_records();
    }
    fn drop_listings(&self) {
        self.0.drop_listings();
    }
    fn drop_blob(&self, id: &BlobId) {
        self.0.drop_blob(id);
    }
    fn corrupt_blob(&self, id: &BlobId) {
        self.0.damage_blob(id);
    }
    fn set_down(&self, down: bool) {
        self.0.inject_faults(7, if down { 100 } else { 0 });
    }
    fn set_latency(&self, latency: Duration) {
        self.0.set_latency(latency);
    }
    fn stall(&self, stalled: bool) {
        self.0.stall(stalled);
    }
}

// ---------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------

/// One build host: a core on its own store, attached to the shared engine.
struct Host {
    core: Arc<Core>,
    tier: Arc<Tier>,
    _store: TempDir,
}

impl Host {
    fn start(backend: &dyn Backend) -> Host {
        Host::start_on(backend, TempDir::new("store"))
    }

    /// A host whose tier waits `timeout` for every answer.
    fn start_with_timeout(backend: &dyn Backend, timeout: Duration) -> Host {
        Host::start_full(backend, TempDir::new("store"), timeout)
    }

    /// Starts a host on an existing store (a restart), waiting for the
    /// previous core on it to be gone (an upload thread may still hold it
    /// for a moment).
    fn start_on(backend: &dyn Backend, store_dir: TempDir) -> Host {
        Host::start_full(backend, store_dir, Duration::from_secs(5))
    }

    fn start_full(backend: &dyn Backend, store_dir: TempDir, timeout: Duration) -> Host {
        let deadline = Instant::now() + Duration::from_secs(WAIT_S);
        let store = loop {
            match open_store(&store_dir.0) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "reopen the store: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let config = Config {
            rules: Rules::new(&[]).unwrap(),
            verify_percent: 100,
            read_only: false,
            durable: false,
            root_uid: None,
            root_gid: None,
            root_mode: None,
        };
        let core = Arc::new(Core::start(store, config).unwrap());
        let weak = Arc::downgrade(&core);
        let lost: Arc<LostRace> = Arc::new(move |path: &[u8], winner| {
            if let Some(core) = weak.upgrade() {
                core.adopt_winner(path, winner);
            }
        });
        let outbox: Weak<dyn Outbox> = Arc::downgrade(&core) as Weak<dyn Outbox>;
        // Sized like a daemon with `--threads 64`.
        let tier = Tier::start(backend.engine(), TierConfig::new(timeout), lost, outbox);
        core.attach_tier(tier.clone(), CLOCK_AHEAD_MAX_NS);
        Host {
            core,
            tier,
            _store: store_dir,
        }
    }

    /// The directory at `dir` (`a/b`), made if missing.
    fn mkdirs(&self, dir: &str) -> Ino {
        let mut ino = Ino::ROOT;
        for part in dir.split('/') {
            ino = match self.core.lookup(ino, part.as_bytes()) {
                Ok(a) => a.ino,
                Err(_) => {
                    self.core
                        .mkdir(ino, part.as_bytes(), 0o755, ME)
                        .unwrap()
                        .ino
                }
            };
        }
        ino
    }

    /// Publishes `bytes` under `dir/name` the way ccache does: a temp
    /// file, then a rename onto the name.
    fn publish(&self, dir: &str, name: &str, bytes: &[u8]) {
        let d = self.mkdirs(dir);
        let (_, fh) = self
            .core
            .create(d, b"t.tmp", 0o644, libc::O_EXCL, ME)
            .unwrap();
        self.core.write(fh, 0, bytes).unwrap();
        self.core.flush(fh).unwrap();
        self.core.release(fh).unwrap();
        self.core
            .rename(d, b"t.tmp", d, name.as_bytes(), 0)
            .unwrap();
    }

    fn lookup(&self, path: &str) -> Result<Attr, i32> {
        let mut attr = self.core.getattr(Ino::ROOT).unwrap();
        for part in path.split('/') {
            attr = self
                .core
                .lookup(attr.ino, part.as_bytes())
                .map_err(|e| e.code())?;
        }
        Ok(attr)
    }

    /// The bytes of `path` as text (all test contents are text).
    fn read(&self, path: &str) -> Result<String, i32> {
        let ino = self.lookup(path)?.ino;
        let (fh, _) = self.core.open(ino, libc::O_RDONLY).map_err(|e| e.code())?;
        let data = self.core.read(fh, 0, 1 << 20).map_err(|e| e.code());
        self.core.release(fh).unwrap();
        data.map(|d| String::from_utf8_lossy(&d).into_owned())
    }

    fn list(&self, dir: &str) -> Vec<String> {
        let ino = if dir.is_empty() {
            Ino::ROOT
        } else {
            self.lookup(dir).unwrap().ino
        };
        let fh = self.core.opendir(ino).unwrap();
        let names = self
            .core
            .readdir(fh)
            .unwrap()
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .filter(|n| n != "." && n != ".." && n != ".casfs")
            .collect();
        self.core.releasedir(fh);
        names
    }

    fn sync(&self) {
        if let Err(e) = self.tier.sync(Duration::from_secs(WAIT_S)) {
            panic!("sync: {e}");
        }
    }

    /// `sync` once the tier is back (it fails at once while the breaker is
    /// still open after an outage).
    fn sync_when_up(&self) -> Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(WAIT_S);
        loop {
            match self.tier.sync(Duration::from_secs(WAIT_S)) {
                Err(e) if e.contains("cannot be delivered now") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                r => return r,
            }
        }
    }

    /// Stops the host (its uploads not yet delivered stay in its store)
    /// and hands back the store.
    fn stop(self) -> TempDir {
        self.core.shutdown();
        self._store
    }
}

fn content(tag: &str, i: usize) -> String {
    format!("{tag} entry {i} ").repeat(50 + i)
}

/// A result name (create-only class).
fn result_name(i: usize) -> String {
    format!("{i:02}c8aiq5frsd7ctaaepqbvl8shkbR")
}

/// The record of `path` as a fresh engine handle reads it.
fn file_record(backend: &dyn Backend, path: &str) -> (BlobId, u64, u16, u64) {
    match backend.engine().get_record(path.as_bytes()).unwrap() {
        Some(Record {
            kind: RecordKind::File { blob, size, mode },
            mtime_ns,
        }) => (blob, size, mode, mtime_ns),
        other => panic!("{path}: not a file record: {other:?}"),
    }
}

fn file_record_bytes(blob: BlobId, size: u64, mode: u16, mtime_ns: u64) -> Vec<u8> {
    Record {
        kind: RecordKind::File { blob, size, mode },
        mtime_ns,
    }
    .encode()
}

// ---------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------

/// Item 4: undecodable, newer-format, oversize and wrong-type records are
/// misses about their own names; the breaker stays closed and every good
/// entry is still served.
fn damaged_records_are_misses_and_never_trip_the_breaker(b: &dyn Backend) {
    let a = Host::start(b);
    for i in 0..20 {
        a.publish("cc/a/e", &result_name(i), content("good", i).as_bytes());
    }
    a.sync();
    let (blob, size, mode, mtime) = file_record(b, &format!("cc/a/e/{}", result_name(0)));
    let damaged: [(&str, Vec<u8>); 4] = [
        ("cc/a/e/90garbageR", b"\xff\xfe not a record".to_vec()),
        (
            "cc/a/e/91newerR",
            String::from_utf8(file_record_bytes(blob, size, mode, mtime))
                .unwrap()
                .replace("casfs-record 1", "casfs-record 2")
                .into_bytes(),
        ),
        ("cc/a/e/92oversizeR", vec![b'x'; 5000]),
        ("cc/a/e/93wrongtypeR", vec![]),
    ];
    for (path, bytes) in &damaged {
        if path.contains("wrongtype") {
            b.put_wrong_type(path);
        } else {
            b.put_raw_record(path, bytes);
        }
    }
    let h = Host::start(b);
    for (path, _) in &damaged {
        assert_eq!(h.read(path), Err(libc::ENOENT), "{path} is a miss");
    }
    assert!(
        !h.tier.breaker_is_open(),
        "damaged records opened the breaker"
    );
    for i in 0..20 {
        let path = format!("cc/a/e/{}", result_name(i));
        assert_eq!(h.read(&path).as_ref(), Ok(&content("good", i)), "{path}");
    }
    assert!(
        h.tier.stats.data_errors.load(Ordering::Relaxed) >= 4,
        "damaged records were not counted"
    );
    assert_eq!(h.tier.stats.errors.load(Ordering::Relaxed), 0);
}

/// Item 5: a record whose size is not its verified blob's is not served.
fn record_size_must_be_the_verified_blobs(b: &dyn Backend) {
    let a = Host::start(b);
    a.publish("cc/s", &result_name(1), content("sized", 1).as_bytes());
    a.publish("cc/s", &result_name(2), content("sized", 2).as_bytes());
    a.sync();
    for (i, factor) in [(1, 2.0), (2, 0.5)] {
        let path = format!("cc/s/{}", result_name(i));
        let (blob, size, mode, mtime) = file_record(b, &path);
        let wrong = (size as f64 * factor) as u64;
        b.put_raw_record(&path, &file_record_bytes(blob, wrong, mode, mtime));
    }
    let h = Host::start(b);
    for i in [1, 2] {
        let path = format!("cc/s/{}", result_name(i));
        assert_eq!(
            h.read(&path),
            Err(libc::ENOENT),
            "{path}: a wrong size is a miss"
        );
    }
    assert!(h.tier.stats.data_errors.load(Ordering::Relaxed) >= 2);
    // The good name next to them is served, with its true size.
    a.publish("cc/s", &result_name(3), content("sized", 3).as_bytes());
    a.sync();
    let attr = h.lookup(&format!("cc/s/{}", result_name(3))).unwrap();
    assert_eq!(attr.size, content("sized", 3).len() as u64);
}

/// Item 6: permission bits from the tier pass through local policy.
fn setuid_bits_from_the_tier_are_never_applied(b: &dyn Backend) {
    let a = Host::start(b);
    a.publish("cc/p", &result_name(1), content("mode", 1).as_bytes());
    a.sync();
    let path = format!("cc/p/{}", result_name(1));
    let (blob, size, _, mtime) = file_record(b, &path);
    b.put_raw_record(&path, &file_record_bytes(blob, size, 0o6755, mtime));
    let h = Host::start(b);
    let attr = h.lookup(&path).unwrap();
    let umask = process_umask();
    assert_eq!(
        u32::from(attr.perm),
        0o755 & !umask,
        "mode 6755 from the tier gave {:o}",
        attr.perm
    );
}

fn process_umask() -> u32 {
    let t = fs::read_to_string("/proc/self/status").unwrap();
    let v = t.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap();
    u32::from_str_radix(v.trim(), 8).unwrap()
}

/// Item 7: a create-only record whose blob is missing or corrupt, whose
/// size is not its blob's, or which is not a record, loses to a verified
/// newcomer; the replacement is counted.
fn damaged_create_only_records_are_replaced_by_a_verified_newcomer(b: &dyn Backend) {
    let a = Host::start(b);
    for i in 0..3 {
        a.publish("cc/h", &result_name(i), content("first", i).as_bytes());
    }
    a.sync();
    let path = |i: usize| format!("cc/h/{}", result_name(i));
    let (blob0, ..) = file_record(b, &path(0));
    b.drop_blob(&blob0);
    let (blob1, ..) = file_record(b, &path(1));
    b.corrupt_blob(&blob1);
    let (blob2, size2, mode2, mtime2) = file_record(b, &path(2));
    b.put_raw_record(
        &path(2),
        &file_record_bytes(blob2, size2 * 2, mode2, mtime2),
    );
    b.put_raw_record(&path(3), b"casfs-record 1\nfile nonsense\n");
    b.put_wrong_type(&path(4));

    // Host B compiles them again (other bytes, as ccache's results are)
    // and publishes.
    let h = Host::start(b);
    for i in 0..5 {
        h.publish("cc/h", &result_name(i), content("second", i).as_bytes());
    }
    h.sync();
    assert_eq!(h.tier.records_healed(), 5, "every damaged record replaced");
    let fresh = Host::start(b);
    for i in 0..5 {
        assert_eq!(
            fresh.read(&path(i)),
            Ok(content("second", i)),
            "{}: a fresh host gets the verified newcomer",
            path(i)
        );
    }
    // A good record still wins a create-only race.
    let late = Host::start(b);
    late.publish("cc/h", &result_name(0), content("third", 0).as_bytes());
    late.sync();
    assert_eq!(late.tier.records_healed(), 0);
    let fresh = Host::start(b);
    assert_eq!(fresh.read(&path(0)), Ok(content("second", 0)));
}

/// A format-1 ccache entry (ccache >= 4.7) around `payload`: header,
/// payload, XXH3-128 of everything before it.
fn ccache_entry(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0xcc, 0xac, 1, 0, 0, 1, 1];
    v.extend_from_slice(&1_700_000_000u64.to_be_bytes());
    v.push(5);
    v.extend_from_slice(b"4.7.5");
    v.push(0);
    let size = (v.len() + 8 + payload.len() + 16) as u64;
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(payload);
    let sum = xxhash_rust::xxh3::xxh3_128(&v).to_be_bytes();
    v.extend_from_slice(&sum);
    v
}

/// Issue 16 item 3: a result whose bytes hash fine but fail ccache's own
/// checksum (a host with bad RAM published it) is replaced in the tier by
/// the first host that publishes a valid one, counted; later hosts get the
/// valid one.
fn a_result_failing_its_own_checksum_is_replaced_by_the_first_valid_republication(b: &dyn Backend) {
    let valid = ccache_entry(&b"object code ".repeat(40));
    let mut poisoned = valid.clone();
    poisoned[40] ^= 0x10; // a flipped bit in the payload: the XXH3 fails
    let path = format!("cc/p/{}", result_name(0));
    let a = Host::start(b);
    a.publish("cc/p", &result_name(0), &poisoned);
    a.sync();
    assert_eq!(file_record(b, &path).0, BlobId::of(&poisoned));
    // B recompiles (its ccache found the entry corrupt) and publishes the
    // valid result: it loses the create-only race, checks the winner, and
    // replaces it.
    let h = Host::start(b);
    h.publish("cc/p", &result_name(0), &valid);
    h.sync();
    let deadline = Instant::now() + Duration::from_secs(WAIT_S);
    while file_record(b, &path).0 != BlobId::of(&valid) {
        assert!(
            Instant::now() < deadline,
            "the poisoned result was not replaced in the tier"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(h.tier.records_healed(), 1, "the replacement is counted");
    let fresh = Host::start(b);
    assert_eq!(
        fresh.read(&path),
        Ok(String::from_utf8_lossy(&valid).into_owned())
    );
    // A valid result in the tier is never replaced.
    let late = Host::start(b);
    late.publish("cc/p", &result_name(0), &ccache_entry(b"other object"));
    late.sync();
    assert_eq!(late.tier.records_healed(), 0);
    assert_eq!(file_record(b, &path).0, BlobId::of(&valid));
}

/// Item 8: names are found when their directories' records were lost,
/// and an upload re-asserts what is above it.
fn names_are_found_when_directory_records_are_lost(b: &dyn Backend) {
    let a = Host::start(b);
    for i in 0..10 {
        a.publish("cc/a/f", &result_name(i), content("deep", i).as_bytes());
    }
    a.sync();
    b.drop_dir_records();
    let h = Host::start(b);
    for i in 0..10 {
        let path = format!("cc/a/f/{}", result_name(i));
        assert_eq!(h.read(&path).as_ref(), Ok(&content("deep", i)), "{path}");
    }
    // Listings lost as well: the next upload below re-asserts them.
    b.drop_dir_records();
    b.drop_listings();
    a.publish("cc/a/f", &result_name(10), content("deep", 10).as_bytes());
    a.sync();
    let h = Host::start(b);
    for i in 0..11 {
        let path = format!("cc/a/f/{}", result_name(i));
        assert_eq!(h.read(&path).as_ref(), Ok(&content("deep", i)), "{path}");
    }
}

/// Item 9: readdir lists names only the tier has, and they can be opened.
fn readdir_lists_names_only_the_tier_has(b: &dyn Backend) {
    let a = Host::start(b);
    let mut want: Vec<String> = (0..14).map(result_name).collect();
    for (i, n) in want.iter().enumerate() {
        a.publish("sc/x/y", n, content("listed", i).as_bytes());
    }
    a.sync();
    let h = Host::start(b);
    assert!(h.list("").contains(&"sc".to_string()), "root lists sc");
    assert_eq!(h.list("sc"), vec!["x".to_string()]);
    let mut got = h.list("sc/x/y");
    got.sort();
    want.sort();
    assert_eq!(got, want, "a fresh host lists the tier's names");
    for (i, n) in (0..14).map(result_name).enumerate() {
        assert_eq!(h.read(&format!("sc/x/y/{n}")), Ok(content("listed", i)));
    }
    // Names fetched are listed once.
    let got = h.list("sc/x/y");
    assert_eq!(got.len(), 14, "{got:?}");
    assert!(h.tier.stats.names_listed.load(Ordering::Relaxed) >= 14);
}

/// Item 10: a mutable entry a host has is revalidated after the freshness
/// bound and takes the newer version and its mtime.
fn mutable_entries_are_revalidated_after_the_freshness_bound(b: &dyn Backend) {
    let a = Host::start(b);
    let name = "0123456789abcdefM";
    let path = format!("cc/m/{name}");
    a.publish("cc/m", name, b"manifest version 1");
    a.sync();
    let h = Host::start(b);
    assert_eq!(h.read(&path).as_deref(), Ok("manifest version 1"));
    a.publish("cc/m", name, b"manifest version 2, longer");
    a.sync();
    let new_mtime = a.lookup(&path).unwrap().mtime_ns;
    let deadline = Instant::now() + Duration::from_secs(WAIT_S);
    loop {
        if h.read(&path).as_deref() == Ok("manifest version 2, longer") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host B still serves the old manifest after {WAIT_S} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(h.lookup(&path).unwrap().mtime_ns, new_mtime);
    assert!(h.tier.stats.refreshed.load(Ordering::Relaxed) >= 1);
}

/// Item 11: a name evicted and fetched again never shows an older mtime
/// than this host showed before.
fn refetched_name_never_shows_an_older_mtime(b: &dyn Backend) {
    let a = Host::start(b);
    let path = format!("cc/t/{}", result_name(1));
    a.publish("cc/t", &result_name(1), content("touched", 1).as_bytes());
    a.sync();
    let h = Host::start(b);
    let first = h.lookup(&path).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let touched = h.core.setattr(first.ino, SetAttr::touch()).unwrap();
    assert!(
        touched.mtime_ns > first.mtime_ns,
        "the touch moved the mtime"
    );
    // The one reference the lookup gave (a kernel never forgets more).
    h.core.forget(first.ino, 1);
    assert!(h.core.evict(0).unwrap() >= 1, "nothing was evicted");
    let again = h.lookup(&path).unwrap();
    assert_ne!(again.ino, first.ino, "it was fetched again");
    assert!(
        again.mtime_ns >= touched.mtime_ns,
        "mtime went back from {} to {} after eviction and re-fetch",
        touched.mtime_ns,
        again.mtime_ns
    );
}

/// Items 1 and 2: uploads made while the engine is down cost no attempt
/// however long the outage lasts (past the breaker's open time), stay in the
/// store across a restart, and are all delivered once the engine is back.
fn uploads_made_during_an_outage_survive_a_restart_and_are_never_given_up(b: &dyn Backend) {
    let a = Host::start(b);
    a.mkdirs("cc/o");
    a.sync();
    b.set_down(true);
    for i in 0..10 {
        a.publish("cc/o", &result_name(i), content("outage", i).as_bytes());
    }
    // Longer than the breaker stays open: it opens, probes and opens again.
    std::thread::sleep(Duration::from_secs(7));
    let failed = a.tier.stats.uploads_failed.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "an upload was given up during the outage");
    let store = a.stop();
    b.set_down(false);
    let a = Host::start_on(b, store);
    a.sync_when_up().expect("sync after the outage");
    assert_eq!(a.tier.stats.uploads_failed.load(Ordering::Relaxed), 0);
    let fresh = Host::start(b);
    for i in 0..10 {
        let path = format!("cc/o/{}", result_name(i));
        assert_eq!(fresh.read(&path), Ok(content("outage", i)), "{path}");
    }
}

/// Item 3: once an upload was given up (here: its local copy vanished
/// before the engine came back), `sync` fails, naming the count and why.
fn sync_fails_naming_count_and_reason_when_an_upload_was_given_up(b: &dyn Backend) {
    let a = Host::start(b);
    a.mkdirs("cc/g");
    a.sync();
    b.set_down(true);
    a.publish("cc/g", &result_name(0), content("lost", 0).as_bytes());
    for shard in fs::read_dir(a._store.0.join("blobs")).unwrap() {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            fs::remove_file(f.unwrap().path()).unwrap();
        }
    }
    b.set_down(false);
    let err = a.sync_when_up().expect_err("sync must fail");
    assert!(
        err.contains("1 uploads given up") && err.contains("local copy gone"),
        "sync's error names neither the count nor the reason: {err}"
    );
    // And it keeps failing.
    assert!(a.sync_when_up().is_err());
}

/// Item 12: a record from a host whose clock runs 30 s fast moves this
/// host's clock at most the bound (1 s); what this host makes afterwards is
/// newer than what it showed.
fn a_fast_hosts_mtime_moves_this_hosts_clock_at_most_the_bound(b: &dyn Backend) {
    let a = Host::start(b);
    a.publish("cc/c", &result_name(0), content("clock", 0).as_bytes());
    a.sync();
    let (blob, size, mode, _) = file_record(b, &format!("cc/c/{}", result_name(0)));
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let fast = now() + 30_000_000_000;
    let path = format!("cc/c/{}", result_name(1));
    b.put_raw_record(&path, &file_record_bytes(blob, size, mode, fast));
    let h = Host::start(b);
    let shown = h.lookup(&path).expect("the fast host's name").mtime_ns;
    let slack = 500_000_000; // this test's own time between the calls
    assert!(
        shown <= now() + CLOCK_AHEAD_MAX_NS + slack,
        "the name shows {} s ahead",
        (shown as f64 - now() as f64) / 1e9
    );
    h.publish("cc/c", &result_name(2), content("clock", 2).as_bytes());
    let mine = h
        .lookup(&format!("cc/c/{}", result_name(2)))
        .unwrap()
        .mtime_ns;
    assert!(mine > shown, "made later but not newer: {mine} <= {shown}");
    assert!(
        mine <= now() + CLOCK_AHEAD_MAX_NS + slack,
        "this host's clock ran {} s ahead",
        (mine as f64 - now() as f64) / 1e9
    );
}

/// Issue 15, item 1: a fresh host with 64 request callers (`--threads
/// 64`) looks up 640 names another host published, from 64 threads at
/// once: every one is found, and the breaker never opens (a full queue is
/// back-pressure, not an engine failure).
fn a_burst_of_64_concurrent_lookups_finds_all_640_names_with_the_breaker_closed(b: &dyn Backend) {
    const THREADS: usize = 64;
    const NAMES: usize = 640;
    let a = Host::start(b);
    let path = |i: usize| format!("cc/{:x}/{}", i % 16, result_name(i));
    for i in 0..NAMES {
        a.publish(
            &format!("cc/{:x}", i % 16),
            &result_name(i),
            content("burst", i).as_bytes(),
        );
    }
    a.sync();
    b.set_latency(Duration::from_millis(5));
    let h = Arc::new(Host::start(b));
    let found = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (h, found) = (h.clone(), found.clone());
            std::thread::spawn(move || {
                for i in (t..NAMES).step_by(THREADS) {
                    match h.lookup(&path(i)) {
                        Ok(attr) if attr.size == content("burst", i).len() as u64 => {
                            found.fetch_add(1, Ordering::Relaxed);
                        }
                        other => eprintln!("{}: {other:?}", path(i)),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    b.set_latency(Duration::ZERO);
    let s = &h.tier.stats;
    assert_eq!(
        found.load(Ordering::Relaxed),
        NAMES,
        "names found by the burst (errors {}, timeouts {}, busy {})",
        s.errors.load(Ordering::Relaxed),
        s.timeouts.load(Ordering::Relaxed),
        s.busy.load(Ordering::Relaxed)
    );
    assert!(
        !h.tier.breaker_is_down(),
        "the breaker opened on a healthy engine"
    );
    assert_eq!(s.errors.load(Ordering::Relaxed), 0, "engine errors counted");
    // And the contents are right.
    for i in (0..NAMES).step_by(37) {
        assert_eq!(h.read(&path(i)), Ok(content("burst", i)));
    }
}

/// Issue 15, item 3: a lookup of a file only the tier has takes its size,
/// mode and mtime from the record and downloads nothing; the blob is
/// fetched (and verified) at open, under the same inode number; a second
/// open is local.
fn a_lookup_takes_attributes_from_the_record_and_the_blob_comes_at_open(b: &dyn Backend) {
    let a = Host::start(b);
    for i in 0..5 {
        a.publish("cc/l", &result_name(i), content("lazy", i).as_bytes());
    }
    a.sync();
    let h = Host::start(b);
    let fetched = || h.tier.stats.blobs_fetched.load(Ordering::Relaxed);
    let mut shown = Vec::new();
    for i in 0..5 {
        let path = format!("cc/l/{}", result_name(i));
        let attr = h.lookup(&path).unwrap();
        assert_eq!(attr.size, content("lazy", i).len() as u64, "{path}");
        assert_eq!(h.core.getattr(attr.ino).unwrap().size, attr.size);
        assert_eq!(attr.mtime_ns, a.lookup(&path).unwrap().mtime_ns);
        shown.push(attr);
    }
    assert_eq!(fetched(), 0, "a lookup or stat downloaded a blob");
    let path = format!("cc/l/{}", result_name(3));
    assert_eq!(h.read(&path), Ok(content("lazy", 3)));
    assert_eq!(fetched(), 1);
    let again = h.lookup(&path).unwrap();
    assert_eq!(again.ino, shown[3].ino, "the inode number changed at open");
    assert_eq!(h.read(&path), Ok(content("lazy", 3)));
    assert_eq!(fetched(), 1, "a second open fetched again");
    // Nothing of the others is stored here.
    assert_eq!(h.core.bytes_stored(), content("lazy", 3).len() as u64);
}

/// Issue 15, item 6: a directory listing more than 4,096 names lists
/// them all on a fresh host (no subset hidden for good).
fn readdir_lists_more_than_4096_names(b: &dyn Backend) {
    const NAMES: usize = 5000;
    let a = Host::start(b);
    a.publish("sc/w", &result_name(0), b"first");
    a.sync();
    let (blob, size, mode, mtime) = file_record(b, &format!("sc/w/{}", result_name(0)));
    let engine = b.engine();
    let record = Record {
        kind: RecordKind::File { blob, size, mode },
        mtime_ns: mtime,
    };
    for i in 1..NAMES {
        let path = format!("sc/w/{}", result_name(i));
        engine.put_record(path.as_bytes(), &record, true).unwrap();
    }
    let h = Host::start(b);
    let mut got = h.list("sc/w");
    got.sort();
    let mut want: Vec<String> = (0..NAMES).map(result_name).collect();
    want.sort();
    assert_eq!(got.len(), NAMES, "names listed");
    assert!(got == want, "other names listed");
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod directory_engine {
            $(#[test] fn $case() { super::$case(&super::DirBackend::new()) })*
        }
        mod redis_engine {
            $(#[test] fn $case() { super::$case(&super::RedisBackend::new()) })*
        }
        mod mem_engine {
            $(#[test] fn $case() { super::$case(&super::MemBackend(casfs::shared::mem::MemEngine::new())) })*
        }
    };
}

conformance!(
    a_result_failing_its_own_checksum_is_replaced_by_the_first_valid_republication,
    a_burst_of_64_concurrent_lookups_finds_all_640_names_with_the_breaker_closed,
    a_lookup_takes_attributes_from_the_record_and_the_blob_comes_at_open,
    readdir_lists_more_than_4096_names,
    damaged_records_are_misses_and_never_trip_the_breaker,
    record_size_must_be_the_verified_blobs,
    setuid_bits_from_the_tier_are_never_applied,
    damaged_create_only_records_are_replaced_by_a_verified_newcomer,
    names_are_found_when_directory_records_are_lost,
    readdir_lists_names_only_the_tier_has,
    mutable_entries_are_revalidated_after_the_freshness_bound,
    refetched_name_never_shows_an_older_mtime,
    uploads_made_during_an_outage_survive_a_restart_and_are_never_given_up,
    sync_fails_naming_count_and_reason_when_an_upload_was_given_up,
    a_fast_hosts_mtime_moves_this_hosts_clock_at_most_the_bound,
);

/// Issue 15, item 4: a stale mutable entry (a ccache manifest) is served
/// from the local store at once while the tier hangs (its deadline far
/// away, so only a wait would show); its check runs in the background.
fn a_local_hit_on_a_stale_mutable_entry_never_waits_on_the_tier(b: &dyn Backend) {
    let a = Host::start(b);
    let name = "0123456789abcdefM";
    let path = format!("cc/n/{name}");
    a.publish("cc/n", name, b"manifest version 1");
    a.sync();
    let h = Arc::new(Host::start_with_timeout(b, Duration::from_secs(600)));
    assert_eq!(h.read(&path).as_deref(), Ok("manifest version 1"));
    let stats = &h.tier.stats;
    let checked = stats.revalidations.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(
        casfs::shared::tier::NEGATIVE_TTL_MS + 200,
    ));
    b.stall(true);
    let (tx, rx) = std::sync::mpsc::channel();
    let (h2, p2) = (h.clone(), path.clone());
    std::thread::spawn(move || {
        let _ = tx.send((h2.lookup(&p2).map(|a| a.size), h2.read(&p2)));
    });
    let got = rx.recv_timeout(Duration::from_secs(WAIT_S));
    let deadline = Instant::now() + Duration::from_secs(WAIT_S);
    while stats.revalidations.load(Ordering::Relaxed) == checked && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    b.stall(false);
    let (size, text) = got.expect("a local hit waited on a hung tier");
    assert_eq!(size, Ok(18));
    assert_eq!(text.as_deref(), Ok("manifest version 1"));
    assert!(
        stats.revalidations.load(Ordering::Relaxed) > checked,
        "the stale entry was never checked in the background"
    );
}

/// Issue 15, item 4: a fresh host's walk of a `cc/X/Y` tree (ccache's
/// `ccache -z`, a `find`) costs the record of `cc` and one round trip per
/// level below it, not one round trip per directory (engines that
/// pipeline listings: Redis, memory).
fn a_fresh_hosts_walk_costs_one_round_trip_per_level(b: &dyn Backend) {
    let a = Host::start(b);
    for x in 0..4 {
        for y in 0..4 {
            a.publish(&format!("cc/{x}/{y}"), &result_name(x * 4 + y), b"walked");
        }
    }
    a.sync();
    let h = Host::start(b);
    for x in 0..4 {
        for y in 0..4 {
            let attr = h.lookup(&format!("cc/{x}/{y}")).unwrap();
            assert_eq!(attr.kind, casfs::store::meta::Kind::Dir);
        }
    }
    let s = &h.tier.stats;
    assert_eq!(s.hits.load(Ordering::Relaxed), 1, "records read: only cc's");
    assert!(
        s.prefetches.load(Ordering::Relaxed) <= 3,
        "{} prefetch round trips for 3 levels",
        s.prefetches.load(Ordering::Relaxed)
    );
    assert_eq!(s.dirs_prefetched.load(Ordering::Relaxed), 4 + 16);
    // And the entries below are found as usual.
    assert_eq!(
        h.read(&format!("cc/3/2/{}", result_name(14))).as_deref(),
        Ok("walked")
    );
}

/// Issue 15, item 5: a transfer is bounded by its progress, not by one
/// deadline: with a bandwidth that makes a 20 MB blob take ten times the
/// 500 ms deadline each way, it is uploaded and fetched whole, and nothing
/// times out.
#[test]
fn mem_engine_a_transfer_ten_times_longer_than_the_deadline_completes() {
    const BYTES: usize = 20 << 20;
    let engine = MemEngine::new();
    let b = MemBackend(engine.clone());
    let deadline = Duration::from_millis(500);
    let a = Host::start_with_timeout(&b, deadline);
    let data: Vec<u8> = (0..BYTES).map(|i| (i * 7 % 251) as u8).collect();
    a.mkdirs("cc/big");
    a.sync();
    engine.set_bandwidth((BYTES as u64) * 1000 / (10 * deadline.as_millis() as u64));
    let d = a.mkdirs("cc/big");
    let (_, fh) = a.core.create(d, b"t.tmp", 0o644, libc::O_EXCL, ME).unwrap();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        a.core.write(fh, (i << 20) as u64, chunk).unwrap();
    }
    a.core.flush(fh).unwrap();
    a.core.release(fh).unwrap();
    let name = result_name(1);
    a.core.rename(d, b"t.tmp", d, name.as_bytes(), 0).unwrap();
    a.sync();
    let h = Host::start_with_timeout(&b, deadline);
    let path = format!("cc/big/{name}");
    let ino = h.lookup(&path).unwrap().ino;
    let (fh, _) = h
        .core
        .open(ino, libc::O_RDONLY)
        .expect("open the big entry");
    let mut got = Vec::new();
    while got.len() < BYTES {
        let part = h.core.read(fh, got.len() as u64, 1 << 20).unwrap();
        assert!(!part.is_empty(), "short read at {}", got.len());
        got.extend(part);
    }
    h.core.release(fh).unwrap();
    engine.set_bandwidth(0);
    assert!(got == data, "other bytes");
    for (host, t) in [("A", &a.tier), ("B", &h.tier)] {
        assert_eq!(
            t.stats.timeouts.load(Ordering::Relaxed),
            0,
            "host {host} timed out"
        );
    }
}

/// Issue 15, item 6: uploads are delivered many at a time, so a host's
/// upload rate is not one chain of round trips at a time (with a 20 ms
/// round trip, many uploads' calls overlap).
#[test]
fn mem_engine_uploads_overlap_their_round_trips() {
    let engine = MemEngine::new();
    let b = MemBackend(engine.clone());
    let a = Host::start(&b);
    a.mkdirs("cc/u");
    a.sync();
    engine.set_latency(Duration::from_millis(20));
    for i in 0..64 {
        a.publish("cc/u", &result_name(i), content("overlap", i).as_bytes());
    }
    a.sync();
    engine.set_latency(Duration::ZERO);
    assert!(
        engine.calls_in_flight_max() >= 8,
        "at most {} engine calls overlapped while 64 uploads were delivered",
        engine.calls_in_flight_max()
    );
    let h = Host::start(&b);
    for i in (0..64).step_by(9) {
        assert_eq!(
            h.read(&format!("cc/u/{}", result_name(i))),
            Ok(content("overlap", i))
        );
    }
}

#[test]
fn mem_engine_a_fresh_hosts_walk_costs_one_round_trip_per_level() {
    a_fresh_hosts_walk_costs_one_round_trip_per_level(&MemBackend(MemEngine::new()));
}

#[test]
fn redis_engine_a_fresh_hosts_walk_costs_one_round_trip_per_level() {
    a_fresh_hosts_walk_costs_one_round_trip_per_level(&RedisBackend::new());
}

#[test]
fn mem_engine_a_local_hit_on_a_stale_mutable_entry_never_waits_on_the_tier() {
    a_local_hit_on_a_stale_mutable_entry_never_waits_on_the_tier(&MemBackend(MemEngine::new()));
}

#[test]
fn redis_engine_a_local_hit_on_a_stale_mutable_entry_never_waits_on_the_tier() {
    a_local_hit_on_a_stale_mutable_entry_never_waits_on_the_tier(&RedisBackend::new());
}

/// Faults and damage chosen by a seed (`CASFS_SEED=N` replays the choices;
/// thread timing may still differ): whatever fails, a host serves the right
/// bytes or a miss, never others; once the faults stop, a second publisher
/// replaces every damaged record and a fresh host reads a valid version of
/// every name (the first publisher's where it is intact, else the second's).
#[test]
fn mem_engine_seeded_faults_and_damage_never_serve_wrong_bytes_and_heal() {
    const NAMES: usize = 30;
    let seed: u64 = std::env::var("CASFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed {seed} (CASFS_SEED={seed} replays it)");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let engine = MemEngine::new();
    let b = MemBackend(engine.clone());
    let a = Host::start(&b);
    engine.inject_faults(seed, 30);
    for i in 0..NAMES {
        a.publish("cc/z", &result_name(i), content("first", i).as_bytes());
    }
    let _ = a.tier.sync(Duration::from_secs(WAIT_S));
    let h = Host::start(&b);
    for i in 0..NAMES {
        match h.read(&format!("cc/z/{}", result_name(i))) {
            Ok(text) => assert_eq!(text, content("first", i), "seed {seed}: name {i}"),
            Err(e) => assert_eq!(e, libc::ENOENT, "seed {seed}: name {i}"),
        }
    }

    // Damage some of what arrived, then stop the faults.
    engine.inject_faults(seed, 0);
    let mut damaged = [false; NAMES];
    for (i, d) in damaged.iter_mut().enumerate() {
        let path = format!("cc/z/{}", result_name(i));
        let Ok(Some(Record {
            kind: RecordKind::File { blob, size, mode },
            mtime_ns,
        })) = engine.get_record(path.as_bytes())
        else {
            continue;
        };
        *d = true;
        match next() % 6 {
            0 => b.drop_blob(&blob),
            1 => b.corrupt_blob(&blob),
            2 => b.put_raw_record(&path, b"casfs-record 1\nfile ?\n"),
            3 => b.put_wrong_type(&path),
            4 => b.put_raw_record(&path, &file_record_bytes(blob, size + 1, mode, mtime_ns)),
            _ => *d = false,
        }
    }
    let second = Host::start(&b);
    for i in 0..NAMES {
        second.publish("cc/z", &result_name(i), content("second", i).as_bytes());
    }
    second.sync();
    let fresh = Host::start(&b);
    for (i, d) in damaged.iter().enumerate() {
        let got = fresh.read(&format!("cc/z/{}", result_name(i)));
        if *d {
            assert_eq!(
                got,
                Ok(content("second", i)),
                "seed {seed}: damaged name {i} healed"
            );
        } else {
            assert!(
                got == Ok(content("first", i)) || got == Ok(content("second", i)),
                "seed {seed}: name {i}: {got:?}"
            );
        }
    }
    assert!(engine.calls() > 0);
}

/// The kernel-facing items on real mounts through a real shared directory:
/// `ls` on a fresh host lists the tier's names (item 9), a record's setuid
/// bits never reach `stat` (item 6), a record's wrong size is a miss, never
/// a short or long read (item 5), and the rest read back whole.
#[test]
fn real_mounts_list_the_tiers_names_and_apply_local_policy() {
    use common::{casfs, errno_of, list_dir, output_text, publish, Mount, TestDir};
    use std::os::unix::fs::PermissionsExt;
    let shared = TestDir::new("conformance-mount-root");
    let root = shared.dir("nfs");
    let url = format!("file://{}", root.display());
    let td = TestDir::new("conformance-mount");
    let (mp_a, mp_b) = (td.mountpoint("a"), td.mountpoint("b"));
    let _a = Mount::start(&td.dir("store-a"), &mp_a, &["--shared", &url]);
    fs::create_dir_all(mp_a.join("sc/q")).unwrap();
    let names: Vec<String> = (0..14).map(result_name).collect();
    for (i, n) in names.iter().enumerate() {
        publish(
            &mp_a.join("sc/q"),
            "t.tmp",
            n,
            content("mounted", i).as_bytes(),
        );
    }
    let out = casfs(&["sync".as_ref(), mp_a.as_os_str()]);
    assert!(out.status.success(), "casfs sync: {}", output_text(&out));

    let record_file = |path: &str| {
        let h = blake3::hash(path.as_bytes()).to_hex();
        root.join("ns/default/records")
            .join(&h[..2])
            .join(h.as_str())
    };
    let damage = |i: usize, f: &dyn Fn(u64, u16) -> (u64, u16)| {
        let file = record_file(&format!("sc/q/{}", names[i]));
        let r = Record::decode(&fs::read(&file).unwrap()).unwrap();
        let RecordKind::File { blob, size, mode } = r.kind else {
            panic!("not a file record")
        };
        let (size, mode) = f(size, mode);
        fs::remove_file(&file).unwrap();
        fs::write(&file, file_record_bytes(blob, size, mode, r.mtime_ns)).unwrap();
    };
    damage(0, &|size, _| (size, 0o6755));
    damage(1, &|size, mode| (size * 2, mode));
    damage(2, &|size, mode| (size / 2, mode));

    let _b = Mount::start(&td.dir("store-b"), &mp_b, &["--shared", &url]);
    let mut want = names.clone();
    want.sort();
    assert_eq!(list_dir(&mp_b.join("sc/q")), want, "ls on a fresh host");
    let mode = fs::metadata(mp_b.join("sc/q").join(&names[0]))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o7000,
        0,
        "setuid/setgid/sticky from the tier: {mode:o}"
    );
    for i in [1, 2] {
        assert_eq!(
            errno_of(fs::read(mp_b.join("sc/q").join(&names[i])), "wrong size"),
            libc::ENOENT,
            "a record whose size is not its blob's is a miss"
        );
    }
    for (i, n) in names.iter().enumerate().skip(3) {
        let p = mp_b.join("sc/q").join(n);
        assert_eq!(
            fs::metadata(&p).unwrap().len(),
            content("mounted", i).len() as u64
        );
        assert_eq!(fs::read_to_string(&p).unwrap(), content("mounted", i));
    }
}
