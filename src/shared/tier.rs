//! The shared tier as the core uses it: an engine behind deadlines, a
//! circuit breaker, a short negative cache, and a bounded write-back queue
//! with upload workers. This is the one place that decides how the network
//! may slow the daemon, and it may never block a build on it.
//!
//! Invariants:
//! - Every engine call made on a request path (`lookup`) returns within
//!   `timeout`: it runs on a caller thread and is abandoned past the
//!   deadline (the answer is a miss).
//! - While the breaker is open no call reaches the engine: lookups miss at
//!   once, uploads wait; it is logged once when it opens and once when it
//!   closes.
//! - Publications are acknowledged locally before they are uploaded; the
//!   queue is bounded (`UPLOAD_QUEUE_LEN_MAX`) and an upload that does not
//!   fit is dropped and counted (this is a cache).
//! - A blob from the tier is never used unless its bytes hash to its id,
//!   nor a record whose size differs from its verified blob's.
//! - A `TierError::Data` (a damaged record about one name) is a miss for
//!   that name, counted and logged once; it never counts against the
//!   breaker, since the engine answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use log::{info, warn};

use super::{Engine, Put, Record, TierError, TierResult};
use crate::stats::{Extra, Histogram, Snapshot};
use crate::store::ids::BlobId;

/// Uploads waiting for a worker.
pub const UPLOAD_QUEUE_LEN_MAX: usize = 16_384;
/// Threads that upload.
const UPLOAD_WORKERS: usize = 2;
/// Threads that run request-path calls under a deadline.
const CALLERS: usize = 4;
/// Consecutive failures that open the breaker, and how long it stays open.
const BREAKER_FAILURES_MAX: u32 = 3;
const BREAKER_OPEN_MS: u64 = 5_000;
/// How often waiting uploads and `sync` look at the breaker.
const BREAKER_POLL_MS: u64 = 100;
/// Attempts per upload before it is given up (counted as failed).
const UPLOAD_ATTEMPTS_MAX: u32 = 5;
/// How long a "not in the shared tier" answer is trusted, and how many
/// such answers are kept.
pub const NEGATIVE_TTL_MS: u64 = 2_000;
const NEGATIVE_ENTRIES_MAX: usize = 65_536;
/// Directory records this daemon remembers having written.
const KNOWN_DIRS_MAX: usize = 65_536;
/// Damaged shared blobs remembered for repair.
const DAMAGED_MAX: usize = 4096;
/// Largest blob fetched from the tier.
pub const FETCH_BYTES_MAX: u64 = 1 << 30;

/// A publication to share: the record for `path`, and where its bytes are.
pub struct Upload {
    pub path: Vec<u8>,
    pub record: Record,
    pub create_only: bool,
    /// The local blob file (read when the tier lacks the blob).
    pub blob_file: std::path::PathBuf,
    pub blob: BlobId,
}

/// What the core does when a create-only upload lost to another host.
pub type LostRace = dyn Fn(&[u8], Record) + Send + Sync;

#[derive(Default)]
pub struct TierStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub uploads: AtomicU64,
    pub uploads_dropped: AtomicU64,
    pub uploads_failed: AtomicU64,
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
}

/// Distinct damaged-record messages logged per mount.
const DATA_LOGGED_MAX: usize = 1024;

struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// Upload accounting for `casfs sync`.
#[derive(Default)]
struct Progress {
    enqueued: u64,
    finished: u64,
    failed: u64,
    last_error: String,
}

type Job = Box<dyn FnOnce() + Send>;

pub struct Tier {
    engine: Arc<dyn Engine>,
    pub timeout: Duration,
    pub stats: TierStats,
    breaker: Mutex<Breaker>,
    breaker_logged_open: AtomicBool,
    negative: Mutex<HashMap<Vec<u8>, Instant>>,
    /// Blobs the tier holds damaged copies of: the next upload of one
    /// replaces it (`Engine::repair_blob`).
    damaged: Mutex<std::collections::HashSet<BlobId>>,
    /// Directories already recorded in the tier by this daemon.
    known_dirs: Mutex<std::collections::HashSet<Vec<u8>>>,
    callers: Sender<Job>,
    uploads: Sender<Upload>,
    progress: Mutex<Progress>,
    progressed: Condvar,
}

impl Tier {
    /// Starts the caller and upload threads. `lost_race` is called (on an
    /// upload thread) when a create-only upload finds another host's record.
    pub fn start(
        engine: Box<dyn Engine>,
        timeout: Duration,
        lost_race: Arc<LostRace>,
    ) -> Arc<Tier> {
        let (callers, caller_rx) = bounded::<Job>(CALLERS * 4);
        let (uploads, upload_rx) = bounded::<Upload>(UPLOAD_QUEUE_LEN_MAX);
        let tier = Arc::new(Tier {
            engine: Arc::from(engine),
            timeout,
            stats: TierStats::default(),
            breaker: Mutex::new(Breaker {
                failures: 0,
                open_until: None,
            }),
            breaker_logged_open: AtomicBool::new(false),
            negative: Mutex::new(HashMap::new()),
            known_dirs: Mutex::new(Default::default()),
            damaged: Mutex::new(Default::default()),
            callers,
            uploads,
            progress: Mutex::new(Progress::default()),
            progressed: Condvar::new(),
        });
        for i in 0..CALLERS {
            let rx: Receiver<Job> = caller_rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("tier-call-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                });
        }
        for i in 0..UPLOAD_WORKERS {
            let rx = upload_rx.clone();
            let tier = tier.clone();
            let lost = lost_race.clone();
            let _ = std::thread::Builder::new()
                .name(format!("tier-upload-{i}"))
                .spawn(move || {
                    for up in rx {
                        tier.upload(up, &*lost);
                    }
                });
        }
        info!(
            "shared tier: {} (timeout {} ms)",
            tier.engine.describe(),
            timeout.as_millis()
        );
        tier
    }

    pub fn describe(&self) -> String {
        self.engine.describe()
    }

    /// Adds the tier's figures to a statistics snapshot.
    pub fn snapshot<'a>(&'a self, snap: &mut Snapshot<'a>) {
        let s = &self.stats;
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows = [
            (
                "shared_hits",
                "Lookups answered by the shared tier",
                v(&s.hits),
                false,
            ),
            (
                "shared_misses",
                "Lookups the shared tier did not know",
                v(&s.misses),
                false,
            ),
            (
                "shared_uploads",
                "Publications delivered to the shared tier",
                v(&s.uploads),
                false,
            ),
            (
                "shared_upload_queue_len",
                "Uploads waiting",
                self.queue_len(),
                true,
            ),
            (
                "shared_uploads_dropped",
                "Uploads dropped because the queue was full",
                v(&s.uploads_dropped),
                false,
            ),
            (
                "shared_uploads_failed",
                "Uploads given up after retries",
                v(&s.uploads_failed),
                false,
            ),
            (
                "shared_errors",
                "Shared-tier calls that failed",
                v(&s.errors),
                false,
            ),
            (
                "shared_timeouts",
                "Shared-tier calls that timed out",
                v(&s.timeouts),
                false,
            ),
            (
                "shared_breaker_open",
                "1 while the shared tier is considered down",
                self.breaker_is_open() as u64,
                true,
            ),
            (
                "shared_corrupt_blobs",
                "Blobs from the shared tier that failed verification",
                v(&s.corrupt_blobs),
                false,
            ),
            (
                "shared_conflicts_lost",
                "Results another host published first (local copy replaced)",
                v(&s.conflicts_lost),
                false,
            ),
            (
                "shared_damaged_records",
                "Shared records that could not be used (unparseable, wrong type, oversize, newer format, size not the blob's)",
                v(&s.data_errors),
                false,
            ),
            (
                "shared_records_healed",
                "Damaged create-only records replaced by a verified newcomer",
                self.engine.records_healed(),
                false,
            ),
            (
                "shared_names_listed",
                "Names readdir listed from the shared tier",
                v(&s.names_listed),
                false,
            ),
            (
                "shared_revalidations",
                "Mutable entries checked against the shared tier after the freshness bound",
                v(&s.revalidations),
                false,
            ),
            (
                "shared_refreshed",
                "Mutable entries replaced by a newer version from the shared tier",
                v(&s.refreshed),
                false,
            ),
        ];
        for (name, help, value, gauge) in rows {
            snap.extras.push(Extra {
                name,
                help,
                value,
                gauge,
            });
        }
        snap.histograms.push((
            "shared_fetch",
            "Latency of lookups answered by the shared tier",
            &s.fetch_ms,
        ));
        snap.histograms
            .push(("shared_upload", "Latency of uploads", &s.upload_ms));
    }

    /// True while calls are refused (until the open period ends; then
    /// the next call is let through to probe the engine).
    pub fn breaker_is_open(&self) -> bool {
        self.breaker
            .lock()
            .unwrap()
            .open_until
            .is_some_and(|t| Instant::now() < t)
    }

    pub fn queue_len(&self) -> u64 {
        self.uploads.len() as u64
    }

    /// False while the breaker is open.
    fn admit(&self) -> bool {
        let mut b = self.breaker.lock().unwrap();
        match b.open_until {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                // Half open: let calls through; one failure re-opens it.
                b.open_until = None;
                b.failures = BREAKER_FAILURES_MAX - 1;
                true
            }
            None => true,
        }
    }

    fn record_outcome<T>(&self, r: &TierResult<T>) {
        let mut b = self.breaker.lock().unwrap();
        match r {
            Ok(_) => {
                b.failures = 0;
                if self.breaker_logged_open.swap(false, Ordering::Relaxed) {
                    info!(
                        "shared tier {} answers again: sharing resumes",
                        self.engine.describe()
                    );
                }
            }
            // Bad data about one name: the engine answered.
            Err(TierError::Data(m)) => {
                b.failures = 0;
                self.stats.data_errors.fetch_add(1, Ordering::Relaxed);
                let mut logged = self.stats.data_logged.lock().unwrap();
                if logged.len() < DATA_LOGGED_MAX && logged.insert(m.clone()) {
                    warn!("shared tier: {m}: treated as a miss (a newer publication replaces it)");
                }
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if matches!(e, TierError::Timeout) {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                b.failures += 1;
                if b.failures >= BREAKER_FAILURES_MAX {
                    b.open_until = Some(Instant::now() + Duration::from_millis(BREAKER_OPEN_MS));
                    // The engine may come back empty (a restarted Redis):
                    // record the directories again.
                    self.known_dirs.lock().unwrap().clear();
                    if !self.breaker_logged_open.swap(true, Ordering::Relaxed) {
                        warn!(
                            "shared tier {} failed {} times ({e}): serving from the local store only; retrying in {} s",
                            self.engine.describe(),
                            b.failures,
                            BREAKER_OPEN_MS / 1000
                        );
                    }
                }
            }
        }
    }

    /// Runs `f` on the engine within the deadline.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Engine) -> TierResult<T> + Send + 'static,
    ) -> TierResult<T> {
        if !self.admit() {
            return Err(TierError::Unavailable("breaker open".into()));
        }
        let (tx, rx) = bounded(1);
        let engine = self.engine.clone();
        let job: Job = Box::new(move || {
            let _ = tx.send(f(&*engine));
        });
        let r = match self.callers.try_send(job) {
            Ok(()) => rx
                .recv_timeout(self.timeout)
                .unwrap_or(Err(TierError::Timeout)),
            // Every caller is stuck on a hung engine.
            Err(_) => Err(TierError::Timeout),
        };
        self.record_outcome(&r);
        r
    }

    /// Looks `path` up: its record, and for a file its verified bytes.
    /// Any failure is a miss; a corrupt blob is counted and is a miss.
    pub fn fetch(&self, path: &[u8]) -> Option<(Record, Option<Vec<u8>>)> {
        if let Some(until) = self.negative.lock().unwrap().get(path) {
            if Instant::now() < *until {
                return None;
            }
        }
        let started = Instant::now();
        let p = path.to_vec();
        let record = match self.call(move |e| e.get_record(&p)) {
            Ok(Some(r)) => r,
            Ok(None) | Err(TierError::Data(_)) => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                self.remember_missing(path);
                return None;
            }
            Err(_) => return None,
        };
        let bytes = match &record.kind {
            super::RecordKind::Dir => None,
            super::RecordKind::File { blob, .. } => {
                let id = *blob;
                let bytes = match self.call(move |e| e.get_blob(&id, FETCH_BYTES_MAX)) {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        warn!(
                            "shared tier: record {:?} names blob {id}, which is missing",
                            String::from_utf8_lossy(path)
                        );
                        self.stats.misses.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    Err(_) => return None,
                };
                if *blake3::hash(&bytes).as_bytes() != id.0 {
                    self.stats.corrupt_blobs.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "shared tier: blob {id} for {:?} does not match its hash: not used (treated as a miss)",
                        String::from_utf8_lossy(path)
                    );
                    self.mark_damaged(id);
                    return None;
                }
                if let super::RecordKind::File { size, .. } = &record.kind {
                    if *size != bytes.len() as u64 {
                        self.note_data_error(format!(
                            "record {:?} claims {size} bytes, its verified blob {id} has {}",
                            String::from_utf8_lossy(path),
                            bytes.len()
                        ));
                        self.stats.misses.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                }
                Some(bytes)
            }
        };
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats.fetch_ms.observe(started.elapsed());
        Some((record, bytes))
    }

    /// Fetches and verifies one blob (convergence).
    pub fn fetch_blob(&self, id: BlobId) -> Option<Vec<u8>> {
        let bytes = self
            .call(move |e| e.get_blob(&id, FETCH_BYTES_MAX))
            .ok()??;
        if *blake3::hash(&bytes).as_bytes() != id.0 {
            self.stats.corrupt_blobs.fetch_add(1, Ordering::Relaxed);
            warn!("shared tier: blob {id} does not match its hash: not used");
            self.mark_damaged(id);
            return None;
        }
        Some(bytes)
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

    /// Queues a publication for upload; never blocks.
    pub fn enqueue(&self, up: Upload) {
        let mut p = self.progress.lock().unwrap();
        match self.uploads.try_send(up) {
            Ok(()) => p.enqueued += 1,
            Err(e) => {
                // Never delivered: `casfs sync` must say so.
                p.enqueued += 1;
                p.finished += 1;
                p.failed += 1;
                p.last_error = "the upload queue was full".into();
                let n = self.stats.uploads_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(
                        "shared tier: upload queue full ({UPLOAD_QUEUE_LEN_MAX}); dropped the upload of {:?} ({n} dropped so far)",
                        String::from_utf8_lossy(&e.into_inner().path)
                    );
                }
            }
        }
    }

    fn upload(&self, up: Upload, lost_race: &LostRace) {
        if !up.blob_file.exists() {
            // Evicted (or dropped as corrupt) before it could be shared:
            // nothing to deliver.
            log::debug!(
                "upload path={:?} outcome=skipped-blob-gone",
                String::from_utf8_lossy(&up.path)
            );
            return self.finish(None);
        }
        let mut last_error = String::new();
        for attempt in 0..UPLOAD_ATTEMPTS_MAX {
            // While the engine is down, uploads wait in the bounded queue
            // (costing no attempt); between attempts they back off.
            while self.breaker_is_open() {
                std::thread::sleep(Duration::from_millis(BREAKER_POLL_MS));
            }
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            let started = Instant::now();
            match self.try_upload(&up) {
                Ok(Put::Stored) => {
                    self.stats.uploads.fetch_add(1, Ordering::Relaxed);
                    self.stats.upload_ms.observe(started.elapsed());
                    self.forget_missing(&up.path);
                    return self.finish(None);
                }
                Ok(Put::Exists(winner)) => {
                    self.stats.uploads.fetch_add(1, Ordering::Relaxed);
                    let same = matches!(&winner.kind, super::RecordKind::File { blob, .. } if *blob == up.blob);
                    if !same {
                        self.stats.conflicts_lost.fetch_add(1, Ordering::Relaxed);
                        lost_race(&up.path, winner);
                    }
                    return self.finish(None);
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        self.stats.uploads_failed.fetch_add(1, Ordering::Relaxed);
        warn!(
            "shared tier: giving up the upload of {:?} after {UPLOAD_ATTEMPTS_MAX} attempts: {last_error}",
            String::from_utf8_lossy(&up.path)
        );
        self.finish(Some(last_error));
    }

    fn try_upload(&self, up: &Upload) -> TierResult<Put> {
        // The directories above the name, so other hosts can walk to it.
        let mut end = 0;
        while let Some(i) = up.path[end..].iter().position(|c| *c == b'/') {
            end += i;
            let dir = up.path[..end].to_vec();
            end += 1;
            if self.known_dirs.lock().unwrap().contains(&dir) {
                continue;
            }
            let (d, rec) = (
                dir.clone(),
                Record {
                    kind: super::RecordKind::Dir,
                    mtime_ns: up.record.mtime_ns,
                },
            );
            self.call(move |e| e.put_record(&d, &rec, true))?;
            let mut known = self.known_dirs.lock().unwrap();
            if known.len() >= KNOWN_DIRS_MAX {
                known.clear();
            }
            known.insert(dir);
        }
        let id = up.blob;
        if self.damaged.lock().unwrap().contains(&id) {
            let bytes = std::fs::read(&up.blob_file)
                .map_err(|e| TierError::Unavailable(format!("read local blob {}: {e}", up.blob)))?;
            if *blake3::hash(&bytes).as_bytes() == id.0 {
                self.call(move |e| e.repair_blob(&id, &bytes))?;
                self.damaged.lock().unwrap().remove(&id);
            }
        } else if !self.call(move |e| e.has_blob(&id))? {
            let bytes = std::fs::read(&up.blob_file)
                .map_err(|e| TierError::Unavailable(format!("read local blob {}: {e}", up.blob)))?;
            self.call(move |e| e.put_blob(&id, &bytes))?;
        }
        let (path, record, create_only) = (up.path.clone(), up.record.clone(), up.create_only);
        self.call(move |e| e.put_record(&path, &record, create_only))
    }

    fn finish(&self, error: Option<String>) {
        let mut p = self.progress.lock().unwrap();
        p.finished += 1;
        if let Some(e) = error {
            p.failed += 1;
            p.last_error = e;
        }
        self.progressed.notify_all();
    }

    /// Waits until every upload queued so far has finished, up to
    /// `deadline`. Ok(n) when all n were delivered; Err(message) if some
    /// failed or the time ran out.
    pub fn sync(&self, deadline: Duration) -> Result<u64, String> {
        let until = Instant::now() + deadline;
        let mut p = self.progress.lock().unwrap();
        let target = p.enqueued;
        let failed_before = p.failed;
        while p.finished < target {
            let now = Instant::now();
            if self.breaker_is_open() {
                return Err(format!(
                    "{} of {target} uploads cannot be delivered now: shared tier {} is down (they wait and retry in the background)",
                    target - p.finished,
                    self.engine.describe()
                ));
            }
            if now >= until {
                return Err(format!(
                    "{} of {target} uploads still pending after {} s (shared tier {})",
                    target - p.finished,
                    deadline.as_secs(),
                    self.engine.describe()
                ));
            }
            let slice = (until - now).min(Duration::from_millis(BREAKER_POLL_MS));
            p = self.progressed.wait_timeout(p, slice).unwrap().0;
        }
        if p.failed > failed_before {
            return Err(format!(
                "{} uploads could not be delivered: {}",
                p.failed - failed_before,
                p.last_error
            ));
        }
        Ok(target)
    }
}

/// What the core asks beyond lookups and uploads: healing, listing and
/// revalidation. Each is one engine call under the deadline and the
/// breaker, like every other.
impl Tier {
    /// Counts and logs (once per message) a damaged record.
    pub fn note_data_error(&self, message: String) {
        self.record_outcome::<()>(&Err(TierError::Data(message)));
    }

    /// The record at `path` only (no blob): `Err` when the engine could
    /// not answer, `Ok(None)` when there is none or it is damaged.
    pub fn record(&self, path: &[u8]) -> TierResult<Option<Record>> {
        let p = path.to_vec();
        match self.call(move |e| e.get_record(&p)) {
            Err(TierError::Data(_)) => Ok(None),
            other => other,
        }
    }

    /// A blob's verified bytes: `Ok(None)` when the tier lacks it or its
    /// bytes fail verification (marked for repair), `Err` when it could
    /// not be asked.
    pub fn blob_checked(&self, id: BlobId) -> TierResult<Option<Vec<u8>>> {
        let Some(bytes) = self.call(move |e| e.get_blob(&id, FETCH_BYTES_MAX))? else {
            return Ok(None);
        };
        if *blake3::hash(&bytes).as_bytes() != id.0 {
            self.stats.corrupt_blobs.fetch_add(1, Ordering::Relaxed);
            warn!("shared tier: blob {id} does not match its hash: not used");
            self.mark_damaged(id);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Replaces the damaged record `seen` at `path` with `record`.
    pub fn replace_damaged(
        &self,
        path: &[u8],
        seen: super::Seen,
        record: Record,
    ) -> TierResult<bool> {
        let p = path.to_vec();
        let r = self.call(move |e| e.replace_damaged(&p, &seen, &record));
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
        self.call(move |e| e.list(&p, super::LIST_NAMES_MAX))
    }
}
