//! Files: this one (callers, deadlines, the breaker's use, lookups,
//! recency reports), `uploads.rs` (the write-back queue, delivery,
//! `sync`), `stats.rs` (the figures), `tests.rs`.
//!
//! The shared tier as the core uses it: an engine behind deadlines, a
//! circuit breaker, a short negative cache, and a bounded write-back queue
//! with upload workers. This is the one place that decides how the network
//! may slow the daemon, and it may never block a build on it.
//!
//! Invariants:
//! - Every engine call made on a request path (`lookup`, `readdir`, `open`)
//!   runs on a request caller thread, of which there are as many as FUSE
//!   workers (`TierConfig::request_callers`, the daemon's `--threads`), so
//!   every worker can wait on the tier at once. A call waits for a free
//!   caller at most `timeout` (back-pressure: `TierError::Busy`, a miss,
//!   never counted against the engine), then the engine gets `timeout` to
//!   answer; past it the call is abandoned (a miss) and counted.
//! - Uploads, convergence and background revalidation run on their own
//!   callers (`BACKGROUND_CALLERS`): they never take a request caller, and
//!   fetches of blobs of `BULK_BYTES_MIN` or more run on the bulk callers.
//! - A blob transfer (and a listing) is bounded by its progress, not by
//!   one deadline (`call_transfer`): given up only when no byte moved for
//!   its idle deadline (`timeout`, at least `TRANSFER_IDLE_MS_MIN`), or
//!   when, past it, it averages below `TRANSFER_FLOOR_BYTES_PER_S`. Blobs stream a chunk at a time; a
//!   fetched one is hashed as it arrives into its staging file, so no
//!   whole blob is ever in memory (`TRANSFER_BYTES_IN_FLIGHT_MAX`).
//! - The breaker (`breaker.rs`) counts only what the engine did. While it
//!   is open no call reaches the engine: lookups miss at once, uploads
//!   wait; half-open lets exactly one probe through. It is logged once when
//!   it opens and once when it closes.
//! - Publications are acknowledged locally before they are uploaded, and
//!   every upload is as durable as its publication: the core writes it to
//!   the store (`Cf::Uploads`) in the publication's own batch, and the
//!   `Outbox` removes it only when the engine has acknowledged it (or it
//!   was given up). After a restart, pending uploads are read back from the
//!   store in publication order. The in-memory queue is bounded
//!   (`UPLOAD_QUEUE_LEN_MAX`); what does not fit waits in the store only.
//! - Waiting for an engine that is down (breaker open, timeouts,
//!   unavailable) costs an upload no attempt. A refusal (the engine
//!   answered no: `TierError::Refused`, e.g. Redis out of memory) costs one,
//!   is counted, kept in the engine's words for `sync` and the statistics,
//!   and retried with backoff. An upload is given up only for a reason
//!   retrying cannot fix (its local blob is gone and the engine lacks it,
//!   its local blob is unreadable, or the engine refused it
//!   `UPLOAD_ATTEMPTS_MAX` times); it is then counted, logged, and every
//!   later `sync` of this mount fails naming it.
//! - Every pause before a retry has full jitter (`breaker::full_jitter`).
//! - A name's uploads are delivered one at a time in publication order, and
//!   one that a later publication of the same name superseded (the local
//!   name no longer holds its blob, or a newer one is queued) is not
//!   delivered: the tier never goes back to an older version.
//! - A blob from the tier is never used unless its bytes hash to its id;
//!   a local blob is checked against its id before it is uploaded.
//! - A record is never used whose size differs from its verified blob's.
//! - A `TierError::Data` (a damaged record about one name) is a miss for
//!   that name, counted and logged once; it never counts against the
//!   breaker, since the engine answered.
//! - A record whose blob the engine does not have (evicted, collected) is
//!   a miss, logged at debug only, and dropped from the engine in the
//!   background (`Uses::drops`, bounded): compare-and-delete of the very
//!   record that named the missing blob, after checking once more that
//!   the blob is still missing.
//! - Uses are reported (`note_use`, from opens of shared entries and from
//!   fetches) at most once per `TierConfig::use_report_interval` per inode,
//!   batched (`USE_BATCH_LEN_MAX`) and sent every `USE_FLUSH_MS` on a
//!   background caller: the collector's recency, at no cost to a hit.
//!
//! Locks: `breaker`, `negative`, `damaged`, `known_dirs`, `uses`,
//! `given_up`, `last_wait_error`, `refusing` and `queue` are each a leaf
//! (held for one change, never across a call or a sleep, never two at
//! once); `collector` is taken only at start and drop.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use log::{info, warn};

use super::breaker::{Admit, Breaker, Outcome, Rng, Transition};
use super::{Engine, Put, Record, TierError, TierResult};
use crate::stats::{Extra, Histogram, Snapshot};
use crate::store::ids::BlobId;

mod stats;
#[cfg(test)]
mod tests;
mod uploads;

use uploads::Queue;
pub use uploads::SyncState;

/// Uploads waiting for a worker in memory (more wait in the store).
pub const UPLOAD_QUEUE_LEN_MAX: usize = 16_384;
/// Queued uploads a worker looks past for one whose path is not in flight.
const IN_FLIGHT_SKIP_MAX: usize = 64;
/// Paths whose newest queued upload is remembered.
const NEWEST_PATHS_MAX: usize = 65_536;
/// How often an idle worker checks that the core is still there.
const QUEUE_POLL_MS: u64 = 1_000;
/// Bounds of the pause between two tries of one upload (full jitter
/// below `BACKOFF_MS_BASE * 2^n`, at most `BACKOFF_MS_MAX`).
const BACKOFF_MS_BASE: u64 = 200;
const BACKOFF_MS_MAX: u64 = 5_000;
/// Bounds of the pause after a refusal (the engine answered no: it needs
/// an operator or time, so the pauses are longer).
const REFUSED_BACKOFF_MS_BASE: u64 = 1_000;
const REFUSED_BACKOFF_MS_MAX: u64 = 30_000;
/// Threads that upload: uploads are delivered this many at a time (one
/// name at a time each), so a host's upload rate is not one round trip
/// chain at a time.
const UPLOAD_WORKERS: usize = 16;
/// Request callers when the caller does not say (the daemon's `--threads`
/// default on a big host), and the fewest the tier runs.
pub const REQUEST_CALLERS_DEFAULT: usize = 64;
const REQUEST_CALLERS_MIN: usize = 4;
/// Most request callers (each a thread; `--threads` is bounded below it).
const REQUEST_CALLERS_MAX: usize = 1024;
/// Threads that run uploads', convergence's and revalidation's calls:
/// one per upload worker, and a few for the rest.
const BACKGROUND_CALLERS: usize = UPLOAD_WORKERS + 4;
/// How often waiting uploads and `sync` look at the breaker.
const BREAKER_POLL_MS: u64 = 100;
/// Attempts per upload that the engine refuses with a non-outage error
/// before it is given up (counted as failed). Outages cost no attempt.
const UPLOAD_ATTEMPTS_MAX: u32 = 8;
/// Why uploads are given up (the reasons `sync` reports).
const GIVEN_UP_GONE: &str = "local copy gone before upload";
const GIVEN_UP_UNREADABLE: &str = "local copy unreadable";
const GIVEN_UP_REFUSED: &str = "refused by the engine";
/// How long a "not in the shared tier" answer is trusted, and how many
/// such answers are kept.
pub const NEGATIVE_TTL_MS: u64 = 2_000;
const NEGATIVE_ENTRIES_MAX: usize = 65_536;
/// Directory records this daemon remembers having written.
const KNOWN_DIRS_MAX: usize = 65_536;
/// Damaged shared blobs remembered for repair.
const DAMAGED_MAX: usize = 4096;
/// Uses waiting to be reported, records waiting to be dropped, inodes
/// whose last report is remembered (past it the memory starts afresh:
/// some uses are reported twice).
const USE_BATCH_LEN_MAX: usize = 4096;
const DROPS_LEN_MAX: usize = 1024;
const USE_REMEMBERED_MAX: usize = 262_144;
/// How often the batch of uses is sent.
const USE_FLUSH_MS: u64 = 5_000;
/// How often a host reports using one entry (`--shared-use-report-s`).
pub const USE_REPORT_S_DEFAULT: u64 = 3600;
/// Largest blob fetched from the tier (it streams to a staging file: the
/// bound is the disk's, not memory's).
pub const FETCH_BYTES_MAX: u64 = 1 << 36;
/// A transfer is given up when no byte moved for its idle deadline, or
/// when, past it, it averages below this rate. One that
/// keeps moving at the floor rate or faster is never cut off, whatever
/// its size.
pub const TRANSFER_FLOOR_BYTES_PER_S: u64 = 64 * 1024;
/// How often a waiter looks at a transfer's progress.
const TRANSFER_POLL_MS: u64 = 50;
/// Blobs at least this big are fetched on the bulk callers, so big
/// transfers never hold the callers lookups need.
pub const BULK_BYTES_MIN: u64 = 1 << 20;
/// Bulk transfers at once (each holds one `TRANSFER_CHUNK_BYTES` buffer),
/// and how many deadlines a bulk fetch waits for a free one.
const BULK_CALLERS: usize = 4;
const BULK_SLOT_WAIT_TIMEOUTS: u32 = 20;
/// Bound on the blob bytes the tier holds in memory at once, whatever the
/// sizes: one chunk per caller that may be moving a blob.
pub const TRANSFER_BYTES_IN_FLIGHT_MAX: usize =
    super::TRANSFER_CHUNK_BYTES * (REQUEST_CALLERS_MAX + BACKGROUND_CALLERS + BULK_CALLERS);

/// A publication to share: the record for `path`, and where its bytes are.
pub struct Upload {
    /// The publication's clock tick: its key in the store, unique, in
    /// publication order.
    pub seq: u64,
    pub path: Vec<u8>,
    pub record: Record,
    pub create_only: bool,
    /// The local blob file (read when the tier lacks the blob).
    pub blob_file: std::path::PathBuf,
    pub blob: BlobId,
}

/// What the core does when a create-only upload lost to another host.
pub type LostRace = dyn Fn(&[u8], Record) + Send + Sync;

/// Where the local name of an upload stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// The name still holds the upload's blob.
    Current,
    /// The name now holds something else: a later publication (which has
    /// its own upload) superseded this one.
    Replaced,
    /// The name is gone here (evicted or deleted); the upload still goes
    /// out if its blob can be found (here under another name, or in the
    /// tier).
    Gone,
    /// The upload is no longer pending (already delivered).
    Settled,
}

/// The durable side of the upload queue, kept by the core in its store.
pub trait Outbox: Send + Sync {
    /// The oldest pending uploads, in publication order, at most `limit`.
    fn pending(&self, limit: usize) -> Vec<Upload>;
    /// The tick of the oldest pending upload.
    fn oldest_seq(&self) -> Result<Option<u64>, String>;
    /// How many uploads are pending (a scan; at start).
    fn count(&self) -> u64;
    fn local(&self, up: &Upload) -> Local;
    /// Forgets a delivered (or given up) upload.
    fn remove(&self, up: &Upload);
    /// A clock tick: above every pending upload's tick published so far.
    fn tick(&self) -> u64;
}

#[derive(Default)]
pub struct TierStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub uploads: AtomicU64,
    pub uploads_dropped: AtomicU64,
    pub uploads_failed: AtomicU64,
    pub uploads_superseded: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub corrupt_blobs: AtomicU64,
    pub conflicts_lost: AtomicU64,
    pub fetch_ms: Histogram,
    pub upload_ms: Histogram,
    /// Damaged records met (`TierError::Data`, or a size that disagrees
    /// with the blob), and the messages already logged (bounded).
    pub data_errors: AtomicU64,
    data_logged: Mutex<std::collections::HashSet<String>>,
    /// Names `readdir` listed from the tier.
    pub names_listed: AtomicU64,
    /// Mutable entries revalidated against the tier, and those refreshed.
    pub revalidations: AtomicU64,
    pub refreshed: AtomicU64,
    /// Calls that found no caller thread free within the deadline.
    pub busy: AtomicU64,
    /// Round trips that prefetched listings for a walk.
    pub prefetches: AtomicU64,
    /// Directories bound from a prefetched listing, with no round trip.
    pub dirs_prefetched: AtomicU64,
    /// Blobs (and their bytes) brought from the tier.
    pub blobs_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    /// Commands the engine refused (`TierError::Refused`), and the last
    /// refusal in the engine's words.
    pub refusals: AtomicU64,
    pub last_refusal: Mutex<String>,
    /// Records dropped because their blob was gone.
    pub records_dropped: AtomicU64,
    /// Uses reported to the engine.
    pub uses_reported: AtomicU64,
}

/// Recency reports and drops waiting for the flusher (`note_use`).
#[derive(Default)]
struct Uses {
    /// When each inode's use was last reported.
    reported: HashMap<u64, Instant>,
    batch: Vec<Vec<u8>>,
    /// Records found naming a missing blob: (path, blob).
    drops: Vec<(Vec<u8>, BlobId)>,
}

/// Distinct damaged-record messages logged per mount.
const DATA_LOGGED_MAX: usize = 1024;

type Job = Box<dyn FnOnce() + Send>;

/// Settings of the tier as the core uses it.
#[derive(Clone, Debug)]
pub struct TierConfig {
    /// How long a call waits for a free caller, and how long the engine
    /// then has to answer.
    pub timeout: Duration,
    /// Request-path calls that may be in flight at once: one per FUSE
    /// worker (the daemon passes `--threads`).
    pub request_callers: usize,
    /// How often one entry's use is reported (`--shared-use-report-s`).
    pub use_report_interval: Duration,
}

impl TierConfig {
    pub fn new(timeout: Duration) -> TierConfig {
        TierConfig {
            timeout,
            request_callers: REQUEST_CALLERS_DEFAULT,
            use_report_interval: Duration::from_secs(USE_REPORT_S_DEFAULT),
        }
    }
}

/// Which callers run a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// A kernel request waits for it (lookup, readdir, open).
    Request,
    /// Nobody waits but a background thread (uploads, convergence,
    /// revalidation).
    Background,
    /// A fetch of a blob of `BULK_BYTES_MIN` or more (its own callers).
    Bulk,
}

/// What became of a blob fetched into a file.
#[derive(Debug)]
pub enum Fetch {
    /// Its bytes are in the file, verified; this many.
    Got(u64),
    /// The tier does not have it.
    Missing,
    /// Its bytes do not hash to its id (marked for repair).
    Corrupt,
    /// Verified, but not the size the record claimed: this size.
    WrongSize(u64),
    /// The tier could not be asked, or the transfer stopped.
    Failed(TierError),
}

/// Writes a blob to a file as it arrives, hashing it on the way.
struct HashingWriter {
    file: std::fs::File,
    hasher: blake3::Hasher,
}

impl std::io::Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Caller threads fed through a rendezvous channel: a job is handed over
/// only to a thread that is free to run it at once, so a job that was
/// handed over is running, and one that was not never reached the engine.
struct Pool {
    jobs: Sender<Job>,
}

impl Pool {
    fn start(name: &str, threads: usize) -> Pool {
        let (jobs, rx) = bounded::<Job>(0);
        for i in 0..threads {
            let rx: Receiver<Job> = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                });
        }
        Pool { jobs }
    }
}

pub struct Tier {
    engine: Arc<dyn Engine>,
    pub timeout: Duration,
    pub stats: TierStats,
    /// Leaf lock, held for one state change or one draw of a pause; never
    /// across a call or a sleep.
    breaker: Mutex<Breaker>,
    breaker_logged_open: AtomicBool,
    request_callers: Pool,
    background_callers: Pool,
    bulk_callers: Pool,
    negative: Mutex<HashMap<Vec<u8>, Instant>>,
    /// Blobs the tier holds damaged copies of: the next upload of one
    /// replaces it (`Engine::repair_blob`).
    damaged: Mutex<std::collections::HashSet<BlobId>>,
    /// Directories already recorded in the tier by this daemon.
    known_dirs: Mutex<std::collections::HashSet<Vec<u8>>>,
    outbox: Weak<dyn Outbox>,
    queue: Mutex<Queue>,
    queue_changed: Condvar,
    /// Uploads in the store (pending), for `sync`, stats and unmount.
    pending: AtomicU64,
    /// Uploads given up by this mount: reason -> (count, last detail).
    /// `progressed` is signalled under this lock when an upload settles.
    given_up: Mutex<BTreeMap<&'static str, (u64, String)>>,
    progressed: Condvar,
    /// The last outage error an upload waited on (for `sync`'s message).
    last_wait_error: Mutex<String>,
    /// The engine's words when it last refused an upload, until an upload
    /// is delivered again (`sync` fails while it is set).
    refusing: Mutex<Option<String>>,
    uses: Mutex<Uses>,
    use_report_interval: Duration,
    /// This daemon's collector (`--shared-gc-max-size`), its budget, and
    /// what its passes did.
    collector: Mutex<Option<super::gc::Collector>>,
    gc_budget_bytes: AtomicU64,
    pub gc_stats: Arc<super::gc::CollectorStats>,
}

impl Tier {
    /// Starts the caller and upload threads. `lost_race` is called (on an
    /// upload thread) when a create-only upload finds another host's record.
    /// The upload workers start with the uploads `outbox` holds from before.
    pub fn start(
        engine: Box<dyn Engine>,
        config: TierConfig,
        lost_race: Arc<LostRace>,
        outbox: Weak<dyn Outbox>,
    ) -> Arc<Tier> {
        let timeout = config.timeout;
        let request_callers = config
            .request_callers
            .clamp(REQUEST_CALLERS_MIN, REQUEST_CALLERS_MAX);
        let pending = outbox.upgrade().map_or(0, |o| o.count());
        let tier = Arc::new(Tier {
            engine: Arc::from(engine),
            timeout,
            stats: TierStats::default(),
            breaker: Mutex::new(Breaker::new(Rng::seed())),
            breaker_logged_open: AtomicBool::new(false),
            request_callers: Pool::start("tier-call", request_callers),
            background_callers: Pool::start("tier-bg-call", BACKGROUND_CALLERS),
            bulk_callers: Pool::start("tier-bulk-call", BULK_CALLERS),
            negative: Mutex::new(HashMap::new()),
            known_dirs: Mutex::new(Default::default()),
            damaged: Mutex::new(Default::default()),
            outbox,
            queue: Mutex::new(Queue {
                // Read back what the store holds from before.
                spilled: true,
                ..Queue::default()
            }),
            queue_changed: Condvar::new(),
            pending: AtomicU64::new(pending),
            given_up: Mutex::new(BTreeMap::new()),
            progressed: Condvar::new(),
            last_wait_error: Mutex::new(String::new()),
            refusing: Mutex::new(None),
            uses: Mutex::new(Uses::default()),
            use_report_interval: config.use_report_interval,
            collector: Mutex::new(None),
            gc_budget_bytes: AtomicU64::new(0),
            gc_stats: Arc::default(),
        });
        let weak = Arc::downgrade(&tier);
        let _ = std::thread::Builder::new()
            .name("tier-uses".into())
            .spawn(move || Tier::flush_uses(weak));
        for i in 0..UPLOAD_WORKERS {
            let tier = tier.clone();
            let lost = lost_race.clone();
            let _ = std::thread::Builder::new()
                .name(format!("tier-upload-{i}"))
                .spawn(move || tier.work(&*lost));
        }
        info!(
            "shared tier: {} (timeout {} ms, {request_callers} request callers)",
            tier.engine.describe(),
            timeout.as_millis()
        );
        if pending > 0 {
            info!(
                "shared tier: {pending} uploads from before this mount are pending; delivering them"
            );
        }
        tier
    }

    pub fn describe(&self) -> String {
        self.engine.describe()
    }

    /// Starts collecting this namespace in the background (at most one
    /// host per namespace collects at once: see `gc.rs`).
    pub fn start_collector(&self, config: super::gc::GcConfig, interval: Duration) {
        self.gc_budget_bytes
            .store(config.max_bytes, Ordering::Relaxed);
        let c = super::gc::Collector::start(
            self.engine.clone(),
            config,
            interval,
            self.gc_stats.clone(),
        );
        *self.collector.lock().unwrap() = Some(c);
    }

    /// True if a use of inode `ino` is due to be reported (and remembers
    /// that it is being reported now).
    pub fn use_due(&self, ino: u64) -> bool {
        let mut u = self.uses.lock().unwrap();
        if u.reported
            .get(&ino)
            .is_some_and(|t| t.elapsed() < self.use_report_interval)
        {
            return false;
        }
        if u.reported.len() >= USE_REMEMBERED_MAX {
            u.reported.clear();
        }
        u.reported.insert(ino, Instant::now());
        true
    }

    /// Reports a use of the entry at `path` (in the next batch).
    pub fn note_use(&self, path: Vec<u8>) {
        let mut u = self.uses.lock().unwrap();
        if u.batch.len() < USE_BATCH_LEN_MAX {
            u.batch.push(path);
        }
    }

    /// The flusher: sends the batch of uses and drops records without
    /// blobs, every `USE_FLUSH_MS`, while the tier lives.
    fn flush_uses(tier: Weak<Tier>) {
        loop {
            std::thread::sleep(Duration::from_millis(USE_FLUSH_MS));
            let Some(tier) = tier.upgrade() else { return };
            let (batch, drops) = {
                let mut u = tier.uses.lock().unwrap();
                (std::mem::take(&mut u.batch), std::mem::take(&mut u.drops))
            };
            if !batch.is_empty() {
                let n = batch.len() as u64;
                let now = super::now_s();
                if tier
                    .call(Lane::Background, move |e| e.note_used(&batch, now))
                    .is_ok()
                {
                    tier.stats.uses_reported.fetch_add(n, Ordering::Relaxed);
                }
            }
            for (path, id) in drops {
                let p = path.clone();
                let dropped = tier.call(Lane::Background, move |e| {
                    let Some(r) = e.get_record(&p)? else {
                        return Ok(false);
                    };
                    let names_it =
                        matches!(r.kind, super::RecordKind::File { blob, .. } if blob == id);
                    if !names_it || e.has_blob(&id)? {
                        return Ok(false);
                    }
                    e.delete_record(&e.record_key(&p), &super::Seen::Bytes(r.encode()))
                });
                if let Ok(true) = dropped {
                    tier.stats.records_dropped.fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "shared drop path={:?} blob={id} outcome=dropped-record-without-blob",
                        String::from_utf8_lossy(&path)
                    );
                }
            }
        }
    }

    /// True while calls are refused outright (the breaker is open and
    /// its period has not ended; half-open lets a probe through).
    pub fn breaker_is_open(&self) -> bool {
        self.breaker.lock().unwrap().is_open(Instant::now())
    }

    /// True while the tier is considered down (open or half-open).
    pub fn breaker_is_down(&self) -> bool {
        self.breaker.lock().unwrap().is_down()
    }

    pub fn queue_len(&self) -> u64 {
        self.queue.lock().unwrap().items.len() as u64
    }

    /// A pause before retry `attempt`, with full jitter (drawn under the
    /// breaker's lock, which is released before anyone sleeps it).
    fn backoff(&self, attempt: u32) -> Duration {
        self.breaker
            .lock()
            .unwrap()
            .backoff(attempt, BACKOFF_MS_BASE, BACKOFF_MS_MAX)
    }

    /// Counts and logs (once per message) a damaged record.
    fn count_data_error(&self, m: &str) {
        self.stats.data_errors.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.stats.data_logged.lock().unwrap();
        if logged.len() < DATA_LOGGED_MAX && logged.insert(m.to_string()) {
            warn!("shared tier: {m}: treated as a miss (a newer publication replaces it)");
        }
    }

    /// Counts what became of a call the breaker let through as `admitted`,
    /// and moves the breaker by what the engine did (only that).
    fn record_outcome<T>(&self, admitted: Admit, r: &TierResult<T>) {
        let outcome = match r {
            Ok(_) => Outcome::Answered,
            Err(TierError::Data(m)) => {
                self.count_data_error(m);
                Outcome::Answered
            }
            Err(TierError::Refused(m)) => {
                self.stats.refusals.fetch_add(1, Ordering::Relaxed);
                *self.stats.last_refusal.lock().unwrap() = m.clone();
                Outcome::Answered
            }
            Err(TierError::Busy) => {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                Outcome::NotTried
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if matches!(e, TierError::Timeout) {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Failed
            }
        };
        let transition = self
            .breaker
            .lock()
            .unwrap()
            .record(admitted, outcome, Instant::now());
        match transition {
            Transition::None => {}
            Transition::Closed => {
                if self.breaker_logged_open.swap(false, Ordering::Relaxed) {
                    info!(
                        "shared tier {} answers again: sharing resumes",
                        self.engine.describe()
                    );
                }
            }
            Transition::Opened => {
                // The engine may come back empty (a restarted Redis):
                // record the directories again.
                self.known_dirs.lock().unwrap().clear();
                if !self.breaker_logged_open.swap(true, Ordering::Relaxed) {
                    let e = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                    warn!(
                        "shared tier {} failed {} times in a row ({e}): serving from the local store only; probing again within {} s",
                        self.engine.describe(),
                        super::breaker::BREAKER_FAILURES_MAX,
                        super::breaker::BREAKER_OPEN_MS_MAX / 1000
                    );
                }
            }
        }
    }

    fn pool(&self, lane: Lane) -> &Pool {
        match lane {
            Lane::Request => &self.request_callers,
            Lane::Background => &self.background_callers,
            Lane::Bulk => &self.bulk_callers,
        }
    }

    /// Runs the transfer `f` on a caller of `lane`, bounded by its
    /// progress, not by one deadline: it is given up (`Timeout`, and told
    /// to stop through `Progress::cancel`) only when no byte moved for its
    /// idle deadline (`timeout`, at least `TRANSFER_IDLE_MS_MIN`), or when,
    /// past that, it averages below `TRANSFER_FLOOR_BYTES_PER_S`. A transfer that keeps moving is never
    /// counted as a failure. Waiting for a free caller is bounded as in
    /// `call` (longer for bulk transfers, which queue behind each other).
    fn call_transfer<T: Send + 'static>(
        &self,
        lane: Lane,
        f: impl FnOnce(&dyn Engine, &super::Progress) -> TierResult<T> + Send + 'static,
    ) -> TierResult<T> {
        let admitted = self.breaker.lock().unwrap().admit(Instant::now());
        if admitted == Admit::Refuse {
            return Err(TierError::Unavailable("breaker open".into()));
        }
        let progress = Arc::new(super::Progress::default());
        let (tx, rx) = bounded(1);
        let engine = self.engine.clone();
        let job_progress = progress.clone();
        let job: Job = Box::new(move || {
            let _ = tx.send(f(&*engine, &job_progress));
        });
        let slot_wait = match lane {
            Lane::Bulk => self.timeout * BULK_SLOT_WAIT_TIMEOUTS,
            _ => self.timeout,
        };
        let r =
            match self.pool(lane).jobs.send_timeout(job, slot_wait) {
                Err(_) => Err(TierError::Busy),
                Ok(()) => {
                    let started = Instant::now();
                    let (mut seen, mut moved_at) = (0, started);
                    let idle_max = self
                        .timeout
                        .max(Duration::from_millis(super::TRANSFER_IDLE_MS_MIN));
                    let poll = Duration::from_millis(TRANSFER_POLL_MS).min(self.timeout);
                    loop {
                        match rx.recv_timeout(poll) {
                            Ok(r) => break r,
                            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                                break Err(TierError::Timeout)
                            }
                            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        }
                        let now = Instant::now();
                        let bytes = progress.bytes();
                        if bytes != seen {
                            (seen, moved_at) = (bytes, now);
                        }
                        let elapsed = now - started;
                        let idle = now - moved_at > idle_max;
                        let slow = elapsed > idle_max
                            && (bytes as f64)
                                < TRANSFER_FLOOR_BYTES_PER_S as f64 * elapsed.as_secs_f64();
                        if idle || slow {
                            progress.cancel();
                            warn!(
                            "shared tier: a transfer {} after {bytes} bytes in {:.1} s: given up",
                            if idle { "stalled" } else { "fell below the floor rate" },
                            elapsed.as_secs_f64()
                        );
                            break Err(TierError::Timeout);
                        }
                    }
                }
            };
        self.record_outcome(admitted, &r);
        r
    }

    /// Fetches blob `id` into `file` (empty, at its start), hashing it as
    /// it arrives; `size_hint` (the record's size) picks the lane: big
    /// ones go to the bulk callers.
    pub fn blob_into(&self, lane: Lane, id: BlobId, size_hint: u64, file: &std::fs::File) -> Fetch {
        let lane = if size_hint >= BULK_BYTES_MIN {
            Lane::Bulk
        } else {
            lane
        };
        let file = match file.try_clone() {
            Ok(f) => f,
            Err(e) => return Fetch::Failed(TierError::Unavailable(format!("staging file: {e}"))),
        };
        let got = self.call_transfer(lane, move |e, progress| {
            let mut sink = HashingWriter {
                file,
                hasher: blake3::Hasher::new(),
            };
            let len = e.get_blob_into(&id, FETCH_BYTES_MAX, &mut sink, progress)?;
            Ok(len.map(|len| (len, *sink.hasher.finalize().as_bytes())))
        });
        let (len, hash) = match got {
            Ok(Some(found)) => found,
            Ok(None) => return Fetch::Missing,
            Err(e) => return Fetch::Failed(e),
        };
        self.stats.blobs_fetched.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
        if hash != id.0 {
            self.stats.corrupt_blobs.fetch_add(1, Ordering::Relaxed);
            warn!("shared tier: blob {id} does not match its hash: not used");
            self.mark_damaged(id);
            return Fetch::Corrupt;
        }
        if len != size_hint {
            return Fetch::WrongSize(len);
        }
        Fetch::Got(len)
    }

    /// Fetches the blob `id` that the record of `path` says has `size`
    /// bytes into `file`, verified: true if it is there whole. Else
    /// (counted as a miss, and logged) the tier lacks it, it fails
    /// verification, its size is not the record's, or it could not be
    /// fetched.
    pub fn fetch_contents_into(
        &self,
        lane: Lane,
        path: &[u8],
        id: BlobId,
        size: u64,
        file: &std::fs::File,
    ) -> bool {
        let shown = || String::from_utf8_lossy(path).into_owned();
        match self.blob_into(lane, id, size, file) {
            Fetch::Got(_) => {
                self.note_use(path.to_vec());
                return true;
            }
            Fetch::Missing => {
                // Evicted or collected: dropped in the background, not
                // warned about at every lookup.
                log::debug!(
                    "shared fetch path={:?} blob={id} outcome=miss-blob-gone",
                    shown()
                );
                let mut u = self.uses.lock().unwrap();
                if u.drops.len() < DROPS_LEN_MAX {
                    u.drops.push((path.to_vec(), id));
                }
            }
            Fetch::Corrupt => warn!(
                "shared tier: record {:?} names blob {id}, which is corrupt: a miss",
                shown()
            ),
            Fetch::WrongSize(len) => self.note_data_error(format!(
                "record {:?} claims {size} bytes, its verified blob {id} has {len}",
                shown()
            )),
            Fetch::Failed(e) => {
                log::debug!("fetch path={:?} blob={id}: {e}", shown());
                return false;
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Runs `f` on the engine on a caller of `lane`: waits for a free
    /// caller at most `timeout` (else `Busy`), then for the answer at most
    /// `timeout` (else `Timeout`; the call is abandoned on its thread).
    fn call<T: Send + 'static>(
        &self,
        lane: Lane,
        f: impl FnOnce(&dyn Engine) -> TierResult<T> + Send + 'static,
    ) -> TierResult<T> {
        let admitted = self.breaker.lock().unwrap().admit(Instant::now());
        if admitted == Admit::Refuse {
            return Err(TierError::Unavailable("breaker open".into()));
        }
        let (tx, rx) = bounded(1);
        let engine = self.engine.clone();
        let job: Job = Box::new(move || {
            let _ = tx.send(f(&*engine));
        });
        let r = match self.pool(lane).jobs.send_timeout(job, self.timeout) {
            // A caller took it: it is running.
            Ok(()) => rx
                .recv_timeout(self.timeout)
                .unwrap_or(Err(TierError::Timeout)),
            // Every caller stayed busy (calls abandoned on a hung engine
            // hold them): back-pressure, not the engine's answer.
            Err(_) => Err(TierError::Busy),
        };
        self.record_outcome(admitted, &r);
        r
    }

    /// Looks `path` up: its record only (attributes without contents;
    /// `fetch_contents` brings a file's bytes when they are needed). Any
    /// failure is a miss.
    pub fn fetch_record(&self, path: &[u8]) -> Option<Record> {
        if let Some(until) = self.negative.lock().unwrap().get(path) {
            if Instant::now() < *until {
                return None;
            }
        }
        let started = Instant::now();
        let p = path.to_vec();
        match self.call(Lane::Request, move |e| e.get_record(&p)) {
            Ok(Some(r)) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                self.stats.fetch_ms.observe(started.elapsed());
                Some(r)
            }
            Ok(None) | Err(TierError::Data(_)) => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                self.remember_missing(path);
                None
            }
            Err(_) => None,
        }
    }

    fn mark_damaged(&self, id: BlobId) {
        let mut d = self.damaged.lock().unwrap();
        if d.len() < DAMAGED_MAX {
            d.insert(id);
        }
    }

    fn remember_missing(&self, path: &[u8]) {
        let mut n = self.negative.lock().unwrap();
        if n.len() >= NEGATIVE_ENTRIES_MAX {
            n.clear();
        }
        n.insert(
            path.to_vec(),
            Instant::now() + Duration::from_millis(NEGATIVE_TTL_MS),
        );
    }

    /// Forgets a cached "missing" answer (the name now exists).
    pub fn forget_missing(&self, path: &[u8]) {
        self.negative.lock().unwrap().remove(path);
    }
}

/// What the core asks beyond lookups and uploads: healing, listing and
/// revalidation. Each is one engine call under the deadline and the
/// breaker, like every other.
impl Tier {
    /// Counts and logs (once per message) a damaged record.
    pub fn note_data_error(&self, message: String) {
        self.count_data_error(&message);
    }

    /// The record at `path` only (no blob): `Err` when the engine could
    /// not answer, `Ok(None)` when there is none or it is damaged.
    pub fn record(&self, lane: Lane, path: &[u8]) -> TierResult<Option<Record>> {
        let p = path.to_vec();
        match self.call(lane, move |e| e.get_record(&p)) {
            Err(TierError::Data(_)) => Ok(None),
            other => other,
        }
    }

    /// Replaces the damaged record `seen` at `path` with `record`.
    pub fn replace_damaged(
        &self,
        path: &[u8],
        seen: super::Seen,
        record: Record,
    ) -> TierResult<bool> {
        let p = path.to_vec();
        let r = self.call(Lane::Background, move |e| {
            e.replace_damaged(&p, &seen, &record)
        });
        if matches!(r, Ok(true)) {
            self.forget_missing(path);
        }
        r
    }

    /// Damaged records the engine replaced in this mount.
    pub fn records_healed(&self) -> u64 {
        self.engine.records_healed()
    }

    /// Names the tier lists below the directory `path` (bounded).
    pub fn list(&self, path: &[u8]) -> TierResult<Vec<super::Listed>> {
        let p = path.to_vec();
        self.call_transfer(Lane::Request, move |e, progress| {
            e.list_counted(&p, super::LIST_NAMES_MAX, progress)
        })
    }

    /// True if the engine lists many directories in one round trip.
    pub fn prefetches(&self) -> bool {
        self.engine.lists_in_one_round_trip()
    }

    /// The first page (`max_each` names) of each listing below `paths`,
    /// in one round trip (see `Engine::list_many`).
    pub fn list_many(
        &self,
        paths: Vec<Vec<u8>>,
        max_each: usize,
    ) -> TierResult<Vec<super::Listing>> {
        self.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        self.call(Lane::Request, move |e| e.list_many(&paths, max_each))
    }
}
