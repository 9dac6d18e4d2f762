//! Collection: keeps one namespace of the shared tier under a byte budget,
//! one host at a time, a bounded page at a time, with nothing but misses
//! for the hosts that race it. Run by `casfs shared gc` (a cron job) or by
//! a daemon mounted with `--shared-gc-max-size` (`Collector`).
//!
//! One pass, under the namespace's lease (`lease_name`), renewed before
//! every page and given up at the end (a daemon keeps it between passes,
//! `GcConfig::keep_lease`, so one host stays the collector while it lives
//! and another takes over within the lease once it dies):
//! 1. *Measure*: scan the namespace's records; damaged ones are deleted
//!    (healing), the others' bytes (blob size + `RECORD_OVERHEAD_BYTES`)
//!    are added to a histogram by age of last use (`AgeHistogram`: fixed
//!    size, so memory does not grow with the number of entries).
//! 2. *Least recently used first*: if the namespace is over its budget,
//!    the histogram gives the age above which everything goes, and how
//!    many bytes of the boundary age; a second scan deletes exactly those
//!    (each by compare-and-delete of the version just read, so a record
//!    republished or used meanwhile stays) until the namespace is at its
//!    low-water mark (`LOW_WATER_PERCENT` of the budget).
//! 3. *Unreferenced blobs*, under the engine-wide blob lease: mark every
//!    namespace's records' blobs in a Bloom filter of fixed size
//!    (`BLOOM_BYTES`; a false positive keeps a garbage blob one more pass,
//!    never deletes a live one), then delete the blobs it does not hold
//!    that were last put before `blob_grace_s` ago: a blob uploaded before
//!    its record (the upload order) is never collected in between, since
//!    every put of a blob, also of one already there, renews its time.
//!    Damaged blobs whose names healed are unreferenced, and go too.
//! 4. *Listings*: names whose record is gone, and listings left empty
//!    (`Engine::sweep_listings`; Redis and the in-memory engine do this as
//!    each record goes).
//!
//! Locks: none held across an engine call. `Collector::stop` (the stop
//! flag) is held only to read or set it; `CollectorStats::last` only to
//! store or copy one report.
//!
//! Races (hosts publish and fetch throughout): a record deleted under a
//! fetcher is a miss (its lookup finds nothing, or its blob fetch finds
//! nothing: both misses); a record put while its blob is being deleted is
//! impossible within the grace period; past it (an upload that waited
//! longer than the grace between its blob and its record) it is a record
//! without its blob, which every host treats as a miss and drops. No path
//! serves bytes that are not the blob's: blobs are verified by hash.

use std::time::Duration;

use log::{info, warn};

use super::{Engine, Lease, RecordKind, Seen, TierError, RECORD_OVERHEAD_BYTES};
use crate::store::ids::BlobId;

/// Records or blobs asked for per scan page (the bound on what one page
/// holds in memory).
pub const GC_PAGE_LEN: usize = 512;
/// A pass stops deleting when the namespace is at this share of its
/// budget, so the next publications do not start a pass at once.
pub const LOW_WATER_PERCENT: u64 = 98;
/// Bytes of the Bloom filter that marks referenced blobs: at 1M entries
/// a false-positive rate below 1e-8, at 10M about 2 % (garbage kept for
/// one more pass). The whole pass's memory is this plus one page.
pub const BLOOM_BYTES: usize = 8 << 20;
const BLOOM_HASHES: usize = 6;
/// A blob last put less than this long ago is never collected.
pub const BLOB_GRACE_S_DEFAULT: u64 = 3600;
/// How long a lease lasts unless renewed (a collector killed mid-pass is
/// replaced within this).
pub const LEASE_TTL_S_DEFAULT: u64 = 60;
/// The lease of blob collection, engine-wide (blobs are shared by all
/// namespaces).
pub const BLOB_LEASE_NAME: &str = "blobs";
/// Bounds of scan pages per pass and per phase, so one pass ends even on
/// an engine whose cursor never does (10^9 records at `GC_PAGE_LEN`).
const PAGES_MAX: usize = 2_000_000;

/// The lease name of collection in `namespace`.
pub fn lease_name(namespace: &str) -> String {
    format!("gc.{namespace}")
}

/// What a pass does.
#[derive(Clone, Debug)]
pub struct GcConfig {
    pub namespace: String,
    /// The namespace's budget: blob bytes of its records plus their
    /// overhead.
    pub max_bytes: u64,
    pub blob_grace_s: u64,
    pub lease_ttl_s: u64,
    /// Who collects (unique per process: `hostname.pid.random`).
    pub holder: String,
    /// Records and blobs per page.
    pub page_len: usize,
    /// Keep the leases after a pass (a daemon that collects every
    /// interval stays the collector while it lives, renewing them each
    /// pass; give it a lease longer than its interval). A one-off pass
    /// (`casfs shared gc`) gives them up.
    pub keep_lease: bool,
}

impl GcConfig {
    pub fn new(namespace: &str, max_bytes: u64) -> GcConfig {
        GcConfig {
            namespace: namespace.to_string(),
            max_bytes,
            blob_grace_s: BLOB_GRACE_S_DEFAULT,
            lease_ttl_s: LEASE_TTL_S_DEFAULT,
            holder: holder_id(),
            page_len: GC_PAGE_LEN,
            keep_lease: false,
        }
    }
}

/// A holder name unique to this process (`hostname.pid.nanos`).
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "host".into())
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(64)
        .collect::<String>();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}.{}.{nanos}", std::process::id())
}

/// What one pass found and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// The namespace's records and bytes when the pass began.
    pub records_before: u64,
    pub bytes_before: u64,
    /// What it holds after (the first scan's figure less what went).
    pub bytes_after: u64,
    /// Least recently used records deleted, and their bytes.
    pub records_removed: u64,
    pub record_bytes_removed: u64,
    /// Damaged records deleted.
    pub damaged_removed: u64,
    /// Unreferenced blobs deleted, and their bytes.
    pub blobs_removed: u64,
    pub blob_bytes_removed: u64,
    /// Blob bytes the engine holds after the pass (all namespaces), if
    /// the blob phase ran.
    pub blob_bytes_after: Option<u64>,
    /// Listing names and listings removed.
    pub listings_removed: u64,
    /// Unix seconds when the pass ended.
    pub finished_s: u64,
}

#[derive(Debug)]
pub enum GcError {
    /// Another collector holds the lease.
    Leased {
        holder: String,
        until_s: u64,
    },
    /// The lease was taken over mid-pass (this collector was too slow to
    /// renew it): the pass stopped.
    LeaseLost,
    Tier(TierError),
}

impl std::fmt::Display for GcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GcError::Leased { holder, until_s } => write!(
                f,
                "another collector ({holder}) holds the lease for {} s more",
                until_s.saturating_sub(super::now_s())
            ),
            GcError::LeaseLost => write!(f, "the lease was taken over mid-pass"),
            GcError::Tier(e) => write!(f, "{e}"),
        }
    }
}

impl From<TierError> for GcError {
    fn from(e: TierError) -> GcError {
        GcError::Tier(e)
    }
}

/// Bytes by age of last use, in buckets of one second up to
/// `EXACT_AGE_S`, then of 1/`LOG_STEPS` of an octave: fixed size, ordered.
pub struct AgeHistogram {
    bytes: Vec<u64>,
}

const EXACT_AGE_S: u64 = 4096;
const LOG_STEPS: f64 = 256.0;
const HISTOGRAM_BUCKETS: usize = EXACT_AGE_S as usize + 64 * 256;

impl Default for AgeHistogram {
    fn default() -> AgeHistogram {
        AgeHistogram {
            bytes: vec![0; HISTOGRAM_BUCKETS],
        }
    }
}

impl AgeHistogram {
    /// The bucket of an age: higher is older.
    pub fn bucket(age_s: u64) -> usize {
        if age_s < EXACT_AGE_S {
            return age_s as usize;
        }
        let steps = ((age_s as f64 / EXACT_AGE_S as f64).log2() * LOG_STEPS) as usize;
        (EXACT_AGE_S as usize + steps).min(HISTOGRAM_BUCKETS - 1)
    }

    pub fn add(&mut self, age_s: u64, bytes: u64) {
        self.bytes[AgeHistogram::bucket(age_s)] += bytes;
    }

    /// To remove `excess` bytes oldest first: every bucket above the
    /// returned one goes whole, and this many bytes of it.
    pub fn cutoff(&self, excess: u64) -> (usize, u64) {
        let mut left = excess;
        for b in (0..self.bytes.len()).rev() {
            if self.bytes[b] >= left {
                return (b, left);
            }
            left -= self.bytes[b];
        }
        (0, self.bytes[0])
    }
}

/// A Bloom filter over blob ids (they are hashes already: the probes are
/// slices of the id).
struct Bloom {
    bits: Vec<u64>,
}

impl Bloom {
    fn new(bytes: usize) -> Bloom {
        Bloom {
            bits: vec![0; bytes / 8],
        }
    }

    fn probes(&self, id: &BlobId) -> impl Iterator<Item = usize> + '_ {
        let n = (self.bits.len() * 64) as u64;
        let id = *id;
        (0..BLOOM_HASHES).map(move |i| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&id.0[i * 4..i * 4 + 8]);
            (u64::from_le_bytes(w) % n) as usize
        })
    }

    fn insert(&mut self, id: &BlobId) {
        let probes: Vec<usize> = self.probes(id).collect();
        for p in probes {
            self.bits[p / 64] |= 1 << (p % 64);
        }
    }

    fn contains(&self, id: &BlobId) -> bool {
        self.probes(id)
            .all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }
}

/// The bytes a record costs its namespace.
fn record_bytes(kind: &RecordKind) -> u64 {
    match kind {
        RecordKind::File { size, .. } => size + RECORD_OVERHEAD_BYTES,
        RecordKind::Dir => RECORD_OVERHEAD_BYTES,
    }
}

/// Holds a lease for one pass: renewed on `renew`, released on drop.
struct Held<'a> {
    engine: &'a dyn Engine,
    name: String,
    config: &'a GcConfig,
}

impl Held<'_> {
    fn take<'a>(
        engine: &'a dyn Engine,
        name: String,
        config: &'a GcConfig,
    ) -> Result<Held<'a>, GcError> {
        match engine.lease(&name, &config.holder, config.lease_ttl_s, super::now_s())? {
            Lease::Held { .. } => Ok(Held {
                engine,
                name,
                config,
            }),
            Lease::Other { holder, until_s } => Err(GcError::Leased { holder, until_s }),
        }
    }

    fn renew(&self) -> Result<(), GcError> {
        match self.engine.lease(
            &self.name,
            &self.config.holder,
            self.config.lease_ttl_s,
            super::now_s(),
        )? {
            Lease::Held { .. } => Ok(()),
            Lease::Other { .. } => Err(GcError::LeaseLost),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if !self.config.keep_lease {
            let _ = self.engine.release_lease(&self.name, &self.config.holder);
        }
    }
}

/// One pass over `engine`'s namespace `config.namespace` (the engine is
/// bound to it), as of `now_s` (ages and the blob grace count from it).
pub fn collect(engine: &dyn Engine, config: &GcConfig, now_s: u64) -> Result<GcReport, GcError> {
    let ns = &config.namespace;
    let lease = Held::take(engine, lease_name(ns), config)?;
    let mut report = GcReport::default();
    let page_len = config.page_len.max(1);

    // 1. Measure (and delete damaged records).
    let mut histogram = AgeHistogram::default();
    let mut cursor = Vec::new();
    for _ in 0..PAGES_MAX {
        lease.renew()?;
        let page = engine.scan_records(ns, &cursor, page_len)?;
        for s in &page.items {
            match &s.record {
                Some(r) => {
                    let bytes = record_bytes(&r.kind);
                    report.records_before += 1;
                    report.bytes_before += bytes;
                    histogram.add(now_s.saturating_sub(s.used_s), bytes);
                }
                None => {
                    if engine.delete_record(&s.key, &s.seen)? {
                        report.damaged_removed += 1;
                    }
                }
            }
        }
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    report.bytes_after = report.bytes_before;

    // 2. Least recently used records, down to the low-water mark.
    if report.bytes_before > config.max_bytes {
        let target = config.max_bytes / 100 * LOW_WATER_PERCENT
            + config.max_bytes % 100 * LOW_WATER_PERCENT / 100;
        let (cut, mut boundary_left) = histogram.cutoff(report.bytes_before - target);
        let mut cursor = Vec::new();
        for _ in 0..PAGES_MAX {
            lease.renew()?;
            let page = engine.scan_records(ns, &cursor, page_len)?;
            for s in &page.items {
                let Some(r) = &s.record else { continue };
                if r.kind == RecordKind::Dir {
                    continue; // kept while anything is listed below
                }
                let b = AgeHistogram::bucket(now_s.saturating_sub(s.used_s));
                let bytes = record_bytes(&r.kind);
                let go = if b > cut {
                    true
                } else if b == cut && boundary_left > 0 {
                    boundary_left = boundary_left.saturating_sub(bytes);
                    true
                } else {
                    false
                };
                if go && engine.delete_record(&s.key, &s.seen)? {
                    report.records_removed += 1;
                    report.record_bytes_removed += bytes;
                    report.bytes_after = report.bytes_after.saturating_sub(bytes);
                }
            }
            match page.next {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }

    // 3. Unreferenced blobs (engine-wide: skipped while another collector
    // of any namespace holds the blob lease).
    match Held::take(engine, BLOB_LEASE_NAME.to_string(), config) {
        Ok(blob_lease) => {
            collect_blobs(engine, config, now_s, &blob_lease, &mut report)?;
        }
        Err(GcError::Leased { holder, .. }) => {
            info!("shared gc namespace={ns} blobs=skipped holder={holder}");
        }
        Err(e) => return Err(e),
    }

    // 4. Listings.
    let mut cursor = Vec::new();
    for _ in 0..PAGES_MAX {
        lease.renew()?;
        let (removed, next) = engine.sweep_listings(&cursor, page_len)?;
        report.listings_removed += removed;
        match next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    report.finished_s = super::now_s();
    info!(
        "shared gc namespace={ns} bytes_before={} bytes_after={} records_removed={} damaged_removed={} blobs_removed={} blob_bytes_removed={} listings_removed={}",
        report.bytes_before,
        report.bytes_after,
        report.records_removed,
        report.damaged_removed,
        report.blobs_removed,
        report.blob_bytes_removed,
        report.listings_removed
    );
    Ok(report)
}

fn collect_blobs(
    engine: &dyn Engine,
    config: &GcConfig,
    now_s: u64,
    lease: &Held<'_>,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let page_len = config.page_len.max(1);
    let mut bloom = Bloom::new(BLOOM_BYTES);
    for ns in engine.namespaces()? {
        let mut cursor = Vec::new();
        for _ in 0..PAGES_MAX {
            lease.renew()?;
            let page = engine.scan_records(&ns, &cursor, page_len)?;
            for s in &page.items {
                if let Some(RecordKind::File { blob, .. }) = s.record.as_ref().map(|r| &r.kind) {
                    bloom.insert(blob);
                }
            }
            match page.next {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }
    let stored_before_s = now_s.saturating_sub(config.blob_grace_s);
    let mut kept_bytes = 0;
    let mut cursor = Vec::new();
    for _ in 0..PAGES_MAX {
        lease.renew()?;
        let page = engine.scan_blobs(&cursor, page_len)?;
        for b in &page.items {
            let unreferenced = !bloom.contains(&b.id);
            if unreferenced
                && b.stored_s < stored_before_s
                && engine.delete_blob(&b.id, stored_before_s)?
            {
                report.blobs_removed += 1;
                report.blob_bytes_removed += b.bytes;
            } else {
                kept_bytes += b.bytes;
            }
        }
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    report.blob_bytes_after = Some(kept_bytes);
    Ok(())
}

/// How a daemon collects: a thread that every `interval` tries the lease
/// and, when it gets it, runs a pass. At most one host per namespace
/// collects at once; the others find the lease held and wait for the
/// next interval.
pub struct Collector {
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the last pass of this daemon did, for statistics.
#[derive(Default)]
pub struct CollectorStats {
    pub last: std::sync::Mutex<Option<GcReport>>,
    pub passes: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
}

impl Collector {
    pub fn start(
        engine: std::sync::Arc<dyn Engine>,
        config: GcConfig,
        interval: Duration,
        stats: std::sync::Arc<CollectorStats>,
    ) -> Collector {
        let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("shared-gc".into())
            .spawn(move || loop {
                {
                    let (lock, cv) = &*stop2;
                    let stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                    let (stopped, _) = cv
                        .wait_timeout_while(stopped, interval, |s| !*s)
                        .unwrap_or_else(|p| p.into_inner());
                    if *stopped {
                        return;
                    }
                }
                match collect(&*engine, &config, super::now_s()) {
                    Ok(r) => {
                        stats
                            .passes
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        *stats.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                    }
                    Err(GcError::Leased { .. }) => {}
                    Err(e) => {
                        stats
                            .failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        warn!(
                            "shared gc namespace={} outcome=failed: {e}",
                            config.namespace
                        );
                    }
                }
            })
            .ok();
        Collector { stop, thread }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The version a scan saw, for a lookup's compare-and-delete of a record
/// whose blob is missing.
pub fn seen_of(record: &super::Record) -> Seen {
    Seen::Bytes(record.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_cutoff_takes_the_oldest_bytes_first() {
        let mut h = AgeHistogram::default();
        h.add(10, 100);
        h.add(20, 100);
        h.add(1_000_000, 100);
        assert_eq!(h.cutoff(150), (AgeHistogram::bucket(20), 50));
        assert_eq!(h.cutoff(100), (AgeHistogram::bucket(1_000_000), 100));
        assert!(AgeHistogram::bucket(u64::MAX) < HISTOGRAM_BUCKETS);
        assert!(AgeHistogram::bucket(5000) > AgeHistogram::bucket(4095));
    }

    #[test]
    fn bloom_holds_what_was_inserted() {
        let mut b = Bloom::new(1024);
        let ids: Vec<BlobId> = (0..50u32).map(|i| BlobId::of(&i.to_le_bytes())).collect();
        for id in &ids {
            b.insert(id);
        }
        assert!(ids.iter().all(|id| b.contains(id)));
        let others = (50..1050u32)
            .filter(|i| b.contains(&BlobId::of(&i.to_le_bytes())))
            .count();
        assert!(others < 50, "{others} false positives of 1000");
    }

    #[test]
    fn leases_encode_and_decode() {
        let v = super::super::encode_lease("h.1.2", 99);
        assert_eq!(super::super::decode_lease(&v), Some(("h.1.2".into(), 99)));
        assert_eq!(super::super::decode_lease(b"casfs-lease 1  9\n"), None);
        assert_eq!(super::super::decode_lease(b"junk"), None);
    }
}
