//! The tier's figures in the statistics (`.casfs/stats`, metrics).

#[allow(unused_imports)]
use super::*;

impl Tier {
    /// Adds the tier's figures to a statistics snapshot.
    pub fn snapshot<'a>(&'a self, snap: &mut Snapshot<'a>) {
        let s = &self.stats;
        let gc_last = self.gc_stats.last.lock().unwrap().clone();
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
                "Uploads waiting in memory for a worker",
                self.queue_len(),
                true,
            ),
            (
                "shared_uploads_pending",
                "Uploads not yet delivered (all kept in the store)",
                self.pending(),
                true,
            ),
            (
                "shared_uploads_dropped",
                "Always 0: uploads that do not fit in memory wait in the store",
                v(&s.uploads_dropped),
                false,
            ),
            (
                "shared_uploads_failed",
                "Uploads given up for a reason retrying cannot fix (logged; casfs sync fails)",
                v(&s.uploads_failed),
                false,
            ),
            (
                "shared_uploads_superseded",
                "Uploads skipped because a later publication of the name replaced them",
                v(&s.uploads_superseded),
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
                "1 while the shared tier is considered down (breaker open or probing)",
                self.breaker_is_down() as u64,
                true,
            ),
            (
                "shared_prefetches",
                "Round trips that prefetched the listings below a directory (a walk's next levels)",
                v(&s.prefetches),
                false,
            ),
            (
                "shared_dirs_prefetched",
                "Directories found in a prefetched listing (bound with no round trip of their own)",
                v(&s.dirs_prefetched),
                false,
            ),
            (
                "shared_blobs_fetched",
                "Blobs brought from the shared tier (at open: a lookup or stat takes only the record)",
                v(&s.blobs_fetched),
                false,
            ),
            (
                "shared_bytes_fetched",
                "Bytes of blobs brought from the shared tier",
                v(&s.bytes_fetched),
                false,
            ),
            (
                "shared_busy",
                "Shared-tier calls that found no caller thread free in time (local back-pressure: misses, never counted against the engine)",
                v(&s.busy),
                false,
            ),
            (
                "shared_refusals",
                "Commands the engine answered with a refusal that is not an outage (e.g. Redis OOM); the last one is in shared_last_refusal",
                v(&s.refusals),
                false,
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
            (
                "shared_records_dropped",
                "Shared records dropped because the engine no longer had their blob",
                v(&s.records_dropped),
                false,
            ),
            (
                "shared_uses_reported",
                "Uses of shared entries reported to the engine (the collector's recency)",
                v(&s.uses_reported),
                false,
            ),
            (
                "shared_gc_budget_bytes",
                "This daemon's collection budget for its namespace (0: it does not collect)",
                v(&self.gc_budget_bytes),
                true,
            ),
            (
                "shared_gc_passes",
                "Collection passes this daemon ran (it held the namespace's lease)",
                v(&self.gc_stats.passes),
                false,
            ),
            (
                "shared_gc_failures",
                "Collection passes that failed (logged)",
                v(&self.gc_stats.failures),
                false,
            ),
            (
                "shared_tier_bytes",
                "The namespace's bytes in the shared tier after this daemon's last pass",
                gc_last.as_ref().map_or(0, |r| r.bytes_after),
                true,
            ),
            (
                "shared_gc_last_finished_s",
                "When this daemon's last collection pass ended (Unix seconds; 0: none)",
                gc_last.as_ref().map_or(0, |r| r.finished_s),
                true,
            ),
            (
                "shared_gc_last_records_removed",
                "Least recently used records the last pass removed",
                gc_last.as_ref().map_or(0, |r| r.records_removed),
                true,
            ),
            (
                "shared_gc_last_damaged_removed",
                "Damaged records the last pass removed",
                gc_last.as_ref().map_or(0, |r| r.damaged_removed),
                true,
            ),
            (
                "shared_gc_last_blobs_removed",
                "Unreferenced blobs the last pass removed",
                gc_last.as_ref().map_or(0, |r| r.blobs_removed),
                true,
            ),
            (
                "shared_gc_last_bytes_removed",
                "Bytes the last pass removed (records' and unreferenced blobs')",
                gc_last
                    .as_ref()
                    .map_or(0, |r| r.record_bytes_removed.max(r.blob_bytes_removed)),
                true,
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
}
