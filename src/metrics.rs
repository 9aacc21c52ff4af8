//! Prometheus metrics (SPEC §13), rendered in the text exposition format. Labels carry only
//! configured names (decision, connector, mode), never raw hosts, paths or agent strings.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Seconds buckets for latency histograms.
const BUCKETS: [f64; 14] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A fixed-bucket histogram with lock-free observation.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: std::array::from_fn(|_| AtomicU64::new(0)), sum_micros: AtomicU64::new(0) }
    }
}

impl Histogram {
    pub fn observe(&self, secs: f64) {
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observes a value that is not a duration (e.g. a batch size), as-is.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

/// Every metric the gateway exports.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, String), u64>>,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub audit_append: Histogram,
    pub config_reloads: Mutex<BTreeMap<&'static str, u64>>,
    pub leaf_cache_hits: AtomicU64,
    pub leaf_cache_misses: AtomicU64,
}

/// Values read at scrape time from other parts of the gateway.
pub struct Gauges {
    pub audit_entries: u64,
    pub audit_queue_depth: u64,
    pub audit_last_batch: u64,
    pub audit_commits: u64,
    /// 0 after a failed write until the writer has reopened the log.
    pub audit_writable: u64,
    pub approvals_pending: u64,
    pub ratelimit_keys: u64,
}

impl Metrics {
    pub fn request(&self, decision: &str, connector: Option<&str>, mode: &str) {
        let key = (decision.to_string(), connector.unwrap_or("none").to_string(), mode.to_string());
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
    }

    pub fn reload(&self, result: &'static str) {
        *self.config_reloads.lock().unwrap_or_else(|e| e.into_inner()).entry(result).or_default() += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP uapk_requests_total Requests decided, by decision, connector and policy mode.\n");
        out.push_str("# TYPE uapk_requests_total counter\n");
        for ((d, c, m), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "uapk_requests_total{{decision=\"{d}\",connector=\"{c}\",mode=\"{m}\"}} {n}");
        }
        self.request_duration.render(
            &mut out,
            "uapk_request_duration_seconds",
            "Time from request to response headers.",
        );
        self.upstream_duration.render(&mut out, "uapk_upstream_duration_seconds", "Upstream time to response headers.");
        self.audit_append.render(
            &mut out,
            "uapk_audit_append_duration_seconds",
            "Time for a decision entry to commit.",
        );
        let mut gauge = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge("uapk_audit_entries_total", "counter", "Entries committed to the audit log.", g.audit_entries);
        gauge("uapk_audit_queue_depth", "gauge", "Entries waiting for the audit writer.", g.audit_queue_depth);
        gauge("uapk_audit_batch_size", "gauge", "Entries in the last committed batch.", g.audit_last_batch);
        gauge(
            "uapk_audit_commits_total",
            "counter",
            "Group commits (one redb transaction and one signed checkpoint each).",
            g.audit_commits,
        );
        gauge(
            "uapk_audit_writable",
            "gauge",
            "1 while the audit log takes writes; 0 after a failed write (a full disk) until it is reopened.",
            g.audit_writable,
        );
        gauge(
            "uapk_tls_leaf_cache_hits_total",
            "counter",
            "Leaf certificates served from the cache.",
            self.leaf_cache_hits.load(Ordering::Relaxed),
        );
        gauge(
            "uapk_tls_leaf_cache_misses_total",
            "counter",
            "Leaf certificates minted.",
            self.leaf_cache_misses.load(Ordering::Relaxed),
        );
        gauge("uapk_approvals_pending", "gauge", "Approvals waiting for a decision.", g.approvals_pending);
        gauge("uapk_ratelimit_keys", "gauge", "Keys held by rate limiters.", g.ratelimit_keys);
        out.push_str(
            "# HELP uapk_config_reloads_total Policy reloads by result.\n# TYPE uapk_config_reloads_total counter\n",
        );
        for (r, n) in self.config_reloads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "uapk_config_reloads_total{{result=\"{r}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP uapk_build_info Build information.\n# TYPE uapk_build_info gauge\nuapk_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}
