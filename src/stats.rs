//! Statistics: counters kept in memory by the daemon and rendered as the
//! read-only files under `.casfs/` (text, JSON, Prometheus).
//!
//! Event counters (hits, misses, ...) count since the daemon started; store
//! gauges (blobs, bytes) are read from the metadata, which keeps them exact.
//! Counter names are part of the interface: add, never rename.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident : $help:literal),* $(,)?) => {
        /// Event counters since the daemon started.
        #[derive(Default)]
        pub struct Counters { $(pub $name: AtomicU64,)* }

        impl Counters {
            fn each(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    lookups: "Name lookups answered by the daemon",
    hits: "Opens of published results",
    misses: "Lookups that found no name",
    publications: "Contents published under a shared name (result or mutable)",
    conflicts: "Create-only conflicts: a rename, link or write onto an existing result that kept the first content",
    corrupt_results_replaced: "Results that failed their own format's checksum and were replaced by a valid newcomer's rename",
    blobs_deduplicated: "Publications whose bytes were already stored",
    corrupt_blobs: "Blobs that failed hash verification (quarantined, never served)",
    blobs_verified: "Blob reads verified against their hash",
    errors: "Operations that failed with an operating error (disk, database)",
    blobs_scrubbed: "Blobs checked against their hash by the background scrub",
    evictions: "Names evicted to keep the store under --max-size",
    bytes_evicted: "Bytes of the names evicted",
    group_lookups: "Supplementary group lists read from /proc for permission checks",
}

/// FUSE operations, for the per-operation request counts.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Lookup,
    Forget,
    Getattr,
    Setattr,
    Readlink,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Releasedir,
    Statfs,
    Access,
    Create,
    Xattr,
    Other,
}

pub const OPS: [(Op, &str); 25] = [
    (Op::Lookup, "lookup"),
    (Op::Forget, "forget"),
    (Op::Getattr, "getattr"),
    (Op::Setattr, "setattr"),
    (Op::Readlink, "readlink"),
    (Op::Mkdir, "mkdir"),
    (Op::Unlink, "unlink"),
    (Op::Rmdir, "rmdir"),
    (Op::Symlink, "symlink"),
    (Op::Rename, "rename"),
    (Op::Link, "link"),
    (Op::Open, "open"),
    (Op::Read, "read"),
    (Op::Write, "write"),
    (Op::Flush, "flush"),
    (Op::Release, "release"),
    (Op::Fsync, "fsync"),
    (Op::Opendir, "opendir"),
    (Op::Readdir, "readdir"),
    (Op::Releasedir, "releasedir"),
    (Op::Statfs, "statfs"),
    (Op::Access, "access"),
    (Op::Create, "create"),
    (Op::Xattr, "xattr"),
    (Op::Other, "other"),
];

/// Gauges read from the store when the files are rendered.
#[derive(Clone, Copy, Default, Debug)]
pub struct StoreGauges {
    pub blobs: u64,
    pub bytes_stored: u64,
    /// Bytes of all names that point at blobs, counting shared blobs once
    /// per name: `bytes_logical - bytes_stored` is what dedup saved.
    pub bytes_logical: u64,
}

/// Bucket bounds of latency histograms, in microseconds (1 µs to 5 s: lock
/// waits are microseconds, shared-tier calls milliseconds).
const HISTOGRAM_BOUNDS_US: [u64; 21] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
    200_000, 500_000, 1_000_000, 2_000_000, 5_000_000,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; HISTOGRAM_BOUNDS_US.len() + 1],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let us = d.as_micros() as u64;
        let i = HISTOGRAM_BOUNDS_US
            .iter()
            .position(|b| us < *b)
            .unwrap_or(HISTOGRAM_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// `quantile_us` in whole milliseconds, rounded up.
    fn quantile_ms(&self, q: f64) -> u64 {
        self.quantile_us(q).div_ceil(1000)
    }

    /// The bucket bound at or below which `q` of the observations fall.
    fn quantile_us(&self, q: f64) -> u64 {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 {
            return 0;
        }
        let want = (count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want {
                return HISTOGRAM_BOUNDS_US.get(i).copied().unwrap_or(u64::MAX);
            }
        }
        u64::MAX
    }
}

/// A value that is not one of the daemon's own event counters (shared-tier
/// figures), for rendering.
pub struct Extra {
    pub name: &'static str,
    pub help: &'static str,
    pub value: u64,
    /// A level (queue length, breaker state) rather than a running count.
    pub gauge: bool,
}

/// Everything the statistics files show besides the event counters.
#[derive(Default)]
pub struct Snapshot<'a> {
    pub gauges: StoreGauges,
    pub extras: Vec<Extra>,
    pub histograms: Vec<(&'static str, &'static str, &'a Histogram)>,
    /// Text values (the shared engine's last refusal, in its own words):
    /// shown in the text and JSON renderings, not in Prometheus's.
    pub notes: Vec<(&'static str, String)>,
}

/// A text value as a JSON string (quotes, backslashes and control
/// characters escaped).
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Default)]
pub struct Stats {
    pub counters: Counters,
    requests: [AtomicU64; OPS.len()],
    /// Time spent waiting for a contended inode or blob lock.
    pub lock_wait: Histogram,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request(&self, op: Op) {
        self.requests[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn requests(&self) -> Vec<(&'static str, u64)> {
        OPS.iter()
            .map(|(op, name)| (*name, self.requests[*op as usize].load(Ordering::Relaxed)))
            .collect()
    }

    /// (name, help, value, is_gauge) in display order.
    fn values(&self, snap: &Snapshot) -> Vec<(&'static str, &'static str, u64, bool)> {
        let g = snap.gauges;
        let mut v: Vec<_> = self
            .counters
            .each()
            .into_iter()
            .map(|(n, h, x)| (n, h, x, false))
            .collect();
        v.push(("blobs", "Blobs in the local store", g.blobs, true));
        v.push((
            "bytes_stored",
            "Bytes of blobs in the local store",
            g.bytes_stored,
            true,
        ));
        v.push((
            "bytes_logical",
            "Bytes of all names pointing at blobs",
            g.bytes_logical,
            true,
        ));
        v.push((
            "bytes_saved",
            "Bytes deduplication saved (logical minus stored)",
            g.bytes_logical.saturating_sub(g.bytes_stored),
            true,
        ));
        for e in &snap.extras {
            v.push((e.name, e.help, e.value, e.gauge));
        }
        let total = self.requests().iter().map(|(_, n)| n).sum();
        v.push((
            "fuse_requests_total",
            "FUSE requests that reached the daemon",
            total,
            false,
        ));
        v
    }

    pub fn render_text(&self, snap: &Snapshot) -> String {
        let g = snap.gauges;
        let mut out = String::from("casfs statistics\n");
        for (name, _, value, _) in self.values(snap) {
            let _ = writeln!(out, "{name:<24} {value}");
        }
        let ratio = if g.bytes_stored == 0 {
            1.0
        } else {
            g.bytes_logical as f64 / g.bytes_stored as f64
        };
        let _ = writeln!(out, "{:<24} {ratio:.2}", "dedup_ratio");
        for (name, text) in &snap.notes {
            // One line each, whatever the engine said.
            let text: String = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let _ = writeln!(out, "{name:<24} {text}");
        }
        for (name, _, h) in &snap.histograms {
            let _ = writeln!(
                out,
                "{name:<24} count {} p50 <{} us p99 <{} us",
                h.count.load(Ordering::Relaxed),
                h.quantile_us(0.5),
                h.quantile_us(0.99)
            );
        }
        out.push_str("fuse requests by operation:\n");
        for (name, n) in self.requests().into_iter().filter(|(_, n)| *n > 0) {
            let _ = writeln!(out, "  {name:<22} {n}");
        }
        out
    }

    pub fn render_json(&self, snap: &Snapshot) -> String {
        let mut out = String::from("{");
        for (name, _, value, _) in self.values(snap) {
            let _ = write!(out, "\"{name}\":{value},");
        }
        for (name, text) in &snap.notes {
            let _ = write!(out, "\"{name}\":{},", json_string(text));
        }
        for (name, _, h) in &snap.histograms {
            let _ = write!(
                out,
                "\"{name}\":{{\"count\":{},\"sum_us\":{},\"p50_ms_max\":{},\"p99_ms_max\":{},\"p50_us_max\":{},\"p99_us_max\":{}}},",
                h.count.load(Ordering::Relaxed),
                h.sum_us.load(Ordering::Relaxed),
                h.quantile_ms(0.5),
                h.quantile_ms(0.99),
                h.quantile_us(0.5),
                h.quantile_us(0.99)
            );
        }
        out.push_str("\"fuse_requests\":{");
        let reqs: Vec<String> = self
            .requests()
            .into_iter()
            .map(|(n, v)| format!("\"{n}\":{v}"))
            .collect();
        out.push_str(&reqs.join(","));
        out.push_str("}}\n");
        out
    }

    pub fn render_prometheus(&self, snap: &Snapshot) -> String {
        let mut out = String::new();
        for (name, help, value, gauge) in self.values(snap) {
            let metric = if gauge {
                format!("casfs_{name}")
            } else {
                format!("casfs_{}_total", name.trim_end_matches("_total"))
            };
            let kind = if gauge { "gauge" } else { "counter" };
            let _ = writeln!(
                out,
                "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {value}"
            );
        }
        for (name, help, h) in &snap.histograms {
            let metric = format!("casfs_{name}_seconds");
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} histogram");
            let mut cumulative = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Ordering::Relaxed);
                let le = match HISTOGRAM_BOUNDS_US.get(i) {
                    Some(us) => format!("{}", *us as f64 / 1e6),
                    None => "+Inf".into(),
                };
                let _ = writeln!(out, "{metric}_bucket{{le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "{metric}_sum {}",
                h.sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "{metric}_count {}", h.count.load(Ordering::Relaxed));
        }
        out.push_str("# HELP casfs_fuse_requests_by_op_total FUSE requests by operation\n");
        out.push_str("# TYPE casfs_fuse_requests_by_op_total counter\n");
        for (name, n) in self.requests() {
            let _ = writeln!(out, "casfs_fuse_requests_by_op_total{{op=\"{name}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_three_formats_with_the_same_numbers() {
        let s = Stats::default();
        Stats::bump(&s.counters.hits);
        s.request(Op::Lookup);
        s.request(Op::Open);
        let h = Histogram::default();
        h.observe(std::time::Duration::from_millis(3));
        let g = StoreGauges {
            blobs: 2,
            bytes_stored: 100,
            bytes_logical: 250,
        };
        let snap = Snapshot {
            gauges: g,
            extras: vec![Extra {
                name: "shared_hits",
                help: "h",
                value: 7,
                gauge: false,
            }],
            histograms: vec![("shared_fetch", "Fetch latency", &h)],
            notes: vec![("shared_last_refusal", "OOM \"quoted\"\n".into())],
        };
        assert!(s.render_text(&snap).contains("hits                     1"));
        let json = s.render_json(&snap);
        assert!(json.contains("\"shared_hits\":7,"));
        assert!(json.contains("\"shared_fetch\":{\"count\":1,"));
        assert!(json.contains("\"hits\":1,"));
        assert!(json.contains("\"bytes_saved\":150,"));
        assert!(json.contains("\"fuse_requests_total\":2,"));
        assert!(json.contains("\"lookup\":1"));
        assert!(
            json.contains("\"shared_last_refusal\":\"OOM \\\"quoted\\\"\\u000a\","),
            "{json}"
        );
        assert!(s
            .render_text(&snap)
            .contains("shared_last_refusal      OOM \"quoted\" \n"));
        let prom = s.render_prometheus(&snap);
        assert!(prom.contains("casfs_shared_fetch_seconds_bucket{le=\"0.005\"} 1"));
        assert!(prom.contains("\ncasfs_hits_total 1\n"));
        assert!(prom.contains("\ncasfs_blobs 2\n"));
        assert!(prom.contains("casfs_fuse_requests_by_op_total{op=\"open\"} 1"));
    }
}
