//! Statistics: counters kept in memory by the daemon and rendered as the
//! read-only files under `.casfs/` (text, JSON, Prometheus).
//!
//! Event counters (result opens, misses, ...) count since the daemon
//! started; store gauges (blobs, bytes) are read from the metadata, which
//! keeps them exact. Counter names are part of the interface: add; rename
//! only a name that misleads, and say so in doc/operations.md (`hits` became
//! `result_opens`: it never counted cache hits).
//!
//! Every FUSE request is timed and its outcome counted, by operation
//! (`Stats::finish`, called by the adapter after the reply): atomics only,
//! no lock on the request path. Histograms have Prometheus's bucket
//! meaning: an observation belongs to the first bucket whose upper bound
//! (`le`) it does not exceed, so one equal to a bound is in that bucket.
//!
//! In the Prometheus file every series carries a `mount` label (the
//! mountpoint), so that the files of two mounts on one host can be
//! exported side by side (node_exporter's textfile collector refuses
//! duplicate series).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

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
    result_opens: "Opens of published results (not cache hits: ccache 2.4 opens a result twice per hit and twice per miss, sccache's mutable entries never)",
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
    orphan_blobs_removed: "Blob files no record named (left by a crash between linking and committing), removed by the sweep after mount",
    orphan_sweeps: "Sweeps of the blob directories for orphan files finished (one after each mount)",
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

/// Bucket upper bounds of latency histograms, in microseconds (1 µs to 5 s:
/// lock waits and hits are microseconds, shared-tier calls milliseconds).
const HISTOGRAM_BOUNDS_US: [u64; 21] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
    200_000, 500_000, 1_000_000, 2_000_000, 5_000_000,
];

/// A latency histogram with fixed buckets; `buckets[i]` counts observations
/// in `(bound[i-1], bound[i]]`, the last one those above every bound.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; HISTOGRAM_BOUNDS_US.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// The bucket an observation of `ns` nanoseconds belongs to: the first
/// whose bound it does not exceed (`le`).
fn bucket_of(ns: u64) -> usize {
    HISTOGRAM_BOUNDS_US
        .iter()
        .position(|b| ns <= b * 1000)
        .unwrap_or(HISTOGRAM_BOUNDS_US.len())
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn sum_us(&self) -> u64 {
        self.sum_ns.load(Ordering::Relaxed) / 1000
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

    /// The Prometheus lines of this histogram: `metric_bucket{labels,le=..}`
    /// (cumulative), `_sum` in seconds, `_count`. `labels` is empty or ends
    /// with a comma.
    fn render_prometheus(&self, out: &mut String, metric: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match HISTOGRAM_BOUNDS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{metric}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        let labels = labels.trim_end_matches(',');
        let _ = writeln!(
            out,
            "{metric}_sum{} {}",
            braces(labels),
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "{metric}_count{} {}",
            braces(labels),
            self.count.load(Ordering::Relaxed)
        );
    }
}

/// `{labels}`, or nothing when there are none.
fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// A Prometheus label value, escaped (backslash, double quote, newline).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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

/// How a failed request failed: an operating error (the store, the disk,
/// corrupt data: logged and counted in `errors`) or an ordinary POSIX
/// answer (ENOENT, EEXIST, EACCES, ...).
pub const ERROR_KINDS: [&str; 2] = ["operating", "posix"];

#[derive(Default)]
pub struct Stats {
    pub counters: Counters,
    /// Time from a request's arrival in the daemon to its reply, by `Op`;
    /// its count is the number of requests.
    request_latency: [Histogram; OPS.len()],
    /// Error replies, by `Op` and `ERROR_KINDS`.
    request_errors: [[AtomicU64; ERROR_KINDS.len()]; OPS.len()],
    /// Time spent waiting for a contended inode or blob lock.
    pub lock_wait: Histogram,
    /// The `mount` label of every Prometheus series (the mountpoint).
    mount_label: OnceLock<String>,
    /// The FUSE transport serving the mount (`fuse_transport`), e.g.
    /// "uring" or "dev".
    transport: OnceLock<String>,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the `mount` label (once, at mount).
    pub fn set_mount_label(&self, mountpoint: &str) {
        let _ = self.mount_label.set(mountpoint.to_owned());
    }

    /// Sets the FUSE transport shown in the statistics (once, at mount).
    pub fn set_transport(&self, transport: &str) {
        let _ = self.transport.set(transport.to_owned());
    }

    /// A request of `op` was answered after `took`; `failed` is `None` for
    /// success, else whether it was an operating error.
    pub fn finish(&self, op: Op, took: Duration, failed: Option<bool>) {
        self.request_latency[op as usize].observe(took);
        if let Some(operating) = failed {
            let kind = if operating { 0 } else { 1 };
            self.request_errors[op as usize][kind].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn requests(&self) -> Vec<(&'static str, u64)> {
        OPS.iter()
            .map(|(op, name)| (*name, self.request_latency[*op as usize].count()))
            .collect()
    }

    fn errors_of(&self, op: Op) -> [u64; ERROR_KINDS.len()] {
        let e = &self.request_errors[op as usize];
        [e[0].load(Ordering::Relaxed), e[1].load(Ordering::Relaxed)]
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
        if let Some(t) = self.transport.get() {
            let _ = writeln!(out, "{:<24} {t}", "fuse_transport");
        }
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
        for (op, name) in OPS {
            let h = &self.request_latency[op as usize];
            if h.count() == 0 {
                continue;
            }
            let [operating, posix] = self.errors_of(op);
            let _ = writeln!(
                out,
                "  {name:<22} {} p50 <{} us p99 <{} us errors {operating} (and {posix} posix answers)",
                h.count(),
                h.quantile_us(0.5),
                h.quantile_us(0.99)
            );
        }
        out
    }

    pub fn render_json(&self, snap: &Snapshot) -> String {
        let mut out = String::from("{");
        if let Some(mount) = self.mount_label.get() {
            let _ = write!(
                out,
                "\"mount\":\"{}\",",
                mount.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        for (name, _, value, _) in self.values(snap) {
            let _ = write!(out, "\"{name}\":{value},");
        }
        for (name, text) in &snap.notes {
            let _ = write!(out, "\"{name}\":{},", json_string(text));
        }
        if let Some(t) = self.transport.get() {
            let _ = write!(out, "\"fuse_transport\":{},", json_string(t));
        }
        for (name, _, h) in &snap.histograms {
            let _ = write!(
                out,
                "\"{name}\":{{\"count\":{},\"sum_us\":{},\"p50_ms_max\":{},\"p99_ms_max\":{},\"p50_us_max\":{},\"p99_us_max\":{}}},",
                h.count.load(Ordering::Relaxed),
                h.sum_us(),
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
        out.push_str("},\"fuse_request_errors\":{");
        let errs: Vec<String> = OPS
            .iter()
            .map(|(op, name)| {
                let [operating, posix] = self.errors_of(*op);
                format!("\"{name}\":{{\"operating\":{operating},\"posix\":{posix}}}")
            })
            .collect();
        out.push_str(&errs.join(","));
        out.push_str("}}\n");
        out
    }

    pub fn render_prometheus(&self, snap: &Snapshot) -> String {
        // `mount="..."`, first in every series; `labels` ends with a comma
        // when there is one, so more labels can follow.
        let labels = match self.mount_label.get() {
            Some(m) => format!("mount=\"{}\",", label_value(m)),
            None => String::new(),
        };
        let plain = braces(labels.trim_end_matches(','));
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
                "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric}{plain} {value}"
            );
        }
        for (name, help, h) in &snap.histograms {
            let metric = format!("casfs_{name}_seconds");
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} histogram");
            h.render_prometheus(&mut out, &metric, &labels);
        }
        out.push_str("# HELP casfs_fuse_requests_by_op_total FUSE requests by operation\n");
        out.push_str("# TYPE casfs_fuse_requests_by_op_total counter\n");
        for (name, n) in self.requests() {
            let _ = writeln!(
                out,
                "casfs_fuse_requests_by_op_total{{{labels}op=\"{name}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP casfs_fuse_request_seconds Time from a FUSE request's arrival in the daemon to its reply, by operation\n",
        );
        out.push_str("# TYPE casfs_fuse_request_seconds histogram\n");
        for (op, name) in OPS {
            self.request_latency[op as usize].render_prometheus(
                &mut out,
                "casfs_fuse_request_seconds",
                &format!("{labels}op=\"{name}\","),
            );
        }
        out.push_str(
            "# HELP casfs_fuse_request_errors_total FUSE requests answered with an error, by operation and kind (operating: the store or disk failed; posix: an ordinary answer such as ENOENT)\n",
        );
        out.push_str("# TYPE casfs_fuse_request_errors_total counter\n");
        for (op, name) in OPS {
            for (kind, n) in ERROR_KINDS.iter().zip(self.errors_of(op)) {
                let _ = writeln!(
                    out,
                    "casfs_fuse_request_errors_total{{{labels}op=\"{name}\",kind=\"{kind}\"}} {n}"
                );
            }
        }
        if let Some(t) = self.transport.get() {
            let _ = writeln!(
                out,
                "# HELP casfs_fuse_transport_info The FUSE transport serving the mount (uring: FUSE over io_uring; dev: /dev/fuse)\n# TYPE casfs_fuse_transport_info gauge\ncasfs_fuse_transport_info{{{labels}transport=\"{}\"}} 1",
                label_value(t)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(h: &Histogram) -> Snapshot<'_> {
        Snapshot {
            gauges: StoreGauges {
                blobs: 2,
                bytes_stored: 100,
                bytes_logical: 250,
            },
            extras: vec![Extra {
                name: "shared_hits",
                help: "h",
                value: 7,
                gauge: false,
            }],
            histograms: vec![("shared_fetch", "Fetch latency", h)],
            notes: vec![("shared_last_refusal", "OOM \"quoted\"\n".into())],
        }
    }

    #[test]
    fn renders_all_three_formats_with_the_same_numbers() {
        let s = Stats::default();
        Stats::bump(&s.counters.result_opens);
        s.finish(Op::Lookup, Duration::from_micros(30), None);
        s.finish(Op::Open, Duration::from_millis(3), Some(true));
        s.finish(Op::Open, Duration::from_micros(40), Some(false));
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        let snap = snapshot(&h);
        let text = s.render_text(&snap);
        assert!(text.contains("result_opens             1"), "{text}");
        assert!(
            text.contains(
                "  open                   2 p50 <50 us p99 <5000 us errors 1 (and 1 posix answers)"
            ),
            "{text}"
        );
        let json = s.render_json(&snap);
        assert!(json.contains("\"shared_hits\":7,"));
        assert!(
            json.contains("\"shared_fetch\":{\"count\":1,\"sum_us\":3000,"),
            "{json}"
        );
        assert!(json.contains("\"result_opens\":1,"));
        assert!(json.contains("\"bytes_saved\":150,"));
        assert!(json.contains("\"fuse_requests_total\":3,"));
        assert!(json.contains("\"lookup\":1"));
        assert!(
            json.contains("\"open\":{\"operating\":1,\"posix\":1}"),
            "{json}"
        );
        assert!(
            json.contains("\"shared_last_refusal\":\"OOM \\\"quoted\\\"\\u000a\","),
            "{json}"
        );
        assert!(s
            .render_text(&snap)
            .contains("shared_last_refusal      OOM \"quoted\" \n"));
        let prom = s.render_prometheus(&snap);
        assert!(prom.contains("casfs_shared_fetch_seconds_bucket{le=\"0.005\"} 1"));
        assert!(prom.contains("\ncasfs_result_opens_total 1\n"));
        assert!(prom.contains("\ncasfs_blobs 2\n"));
        assert!(prom.contains("casfs_fuse_requests_by_op_total{op=\"open\"} 2"));
        assert!(prom.contains("casfs_fuse_request_seconds_bucket{op=\"open\",le=\"0.00005\"} 1\n"));
        assert!(prom.contains("casfs_fuse_request_seconds_bucket{op=\"open\",le=\"+Inf\"} 2\n"));
        assert!(prom.contains("casfs_fuse_request_seconds_count{op=\"open\"} 2\n"));
        assert!(
            prom.contains("casfs_fuse_request_seconds_sum{op=\"open\"} 0.00304\n"),
            "{prom}"
        );
        assert!(
            prom.contains("casfs_fuse_request_errors_total{op=\"open\",kind=\"operating\"} 1\n")
        );
        assert!(prom.contains("casfs_fuse_request_errors_total{op=\"open\",kind=\"posix\"} 1\n"));
        assert!(
            prom.contains("casfs_fuse_request_errors_total{op=\"lookup\",kind=\"operating\"} 0\n")
        );
    }

    #[test]
    fn an_observation_equal_to_a_bucket_bound_is_in_that_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(1)); // le 1 µs
        h.observe(Duration::from_nanos(1001)); // above 1 µs: le 2 µs
        h.observe(Duration::from_millis(5)); // le 5 ms
        h.observe(Duration::from_nanos(5_000_001)); // le 10 ms
        h.observe(Duration::from_secs(60)); // +Inf
        let mut out = String::new();
        h.render_prometheus(&mut out, "m", "");
        for line in [
            "m_bucket{le=\"0.000001\"} 1\n",
            "m_bucket{le=\"0.000002\"} 2\n",
            "m_bucket{le=\"0.002\"} 2\n",
            "m_bucket{le=\"0.005\"} 3\n",
            "m_bucket{le=\"0.01\"} 4\n",
            "m_bucket{le=\"5\"} 4\n",
            "m_bucket{le=\"+Inf\"} 5\n",
            "m_count 5\n",
        ] {
            assert!(out.contains(line), "no {line:?} in\n{out}");
        }
        assert_eq!(h.quantile_us(0.2), 1, "the first fifth is at or below 1 µs");
    }

    #[test]
    fn every_prometheus_series_carries_the_mount_label() {
        let s = Stats::default();
        s.set_mount_label("/var/cache/c\"c\\1");
        s.finish(Op::Read, Duration::from_micros(7), None);
        let h = Histogram::default();
        let prom = s.render_prometheus(&snapshot(&h));
        let label = "mount=\"/var/cache/c\\\"c\\\\1\"";
        let mut series = 0;
        for line in prom.lines().filter(|l| !l.starts_with('#')) {
            series += 1;
            let (name, _) = line
                .split_once('{')
                .unwrap_or_else(|| panic!("no labels: {line}"));
            assert!(name.starts_with("casfs_"), "{line}");
            assert!(
                line[name.len()..].starts_with(&format!("{{{label}")),
                "every series starts its labels with the mount: {line}"
            );
        }
        assert!(series > 600, "{series} series");
        assert!(prom.contains(&format!("casfs_blobs{{{label}}} 2\n")));
        assert!(prom.contains(&format!(
            "casfs_fuse_request_seconds_bucket{{{label},op=\"read\",le=\"0.00001\"}} 1\n"
        )));
        assert!(s
            .render_json(&snapshot(&h))
            .starts_with("{\"mount\":\"/var/cache/c\\\"c\\\\1\","));
    }
}
