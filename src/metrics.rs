//! Prometheus metrics (SPEC §13), rendered in the text exposition format. Labels carry only
//! closed sets and configured names, never raw hosts, paths or agent-supplied strings, so the
//! number of series stays bounded: `decision` (3 verdicts), `reason` (the reason codes in
//! [`crate::policy::Code`], anything else `other`), `agent` (configured agent ids; `unknown` for an id
//! no manifest configures, `-` before one is known), `connector` (configured names) and `mode`.
//! Process metrics are read from `/proc/self` at scrape time (a few small reads; the open-fd
//! count lists `/proc/self/fd`, bounded by the open-file limit).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Seconds buckets for latency histograms.
const BUCKETS: [f64; 14] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A fixed-bucket histogram with lock-free observation.
pub(crate) struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: std::array::from_fn(|_| AtomicU64::new(0)), sum_micros: AtomicU64::new(0) }
    }
}

impl Histogram {
    pub(crate) fn observe(&self, secs: f64) {
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observes a value that is not a duration (e.g. a batch size), as-is.
    pub(crate) fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, "");
    }

    /// The series of one histogram without its header; `labels` (`k="v",…`) go before `le`.
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {cum}");
    }
}

/// The `reason` label of a code: itself when it is a known reason code, else `other`.
pub(crate) fn reason_label(code: &str) -> &'static str {
    code.parse::<crate::policy::Code>().map_or("other", crate::policy::Code::as_str)
}

/// The labels of one `uapk_requests_total` series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RequestLabels {
    decision: &'static str,
    reason: &'static str,
    agent: String,
    connector: String,
    mode: &'static str,
}

/// Spans that reached the collector or were lost on the way (`telemetry`).
#[derive(Debug, Default)]
pub(crate) struct SpanStats {
    pub exported: AtomicU64,
    /// Dropped because the export queue was full (the collector is slower than the traffic).
    pub dropped_queue_full: AtomicU64,
    /// Dropped because an export failed or did not finish within `telemetry.otlp.timeout`.
    pub dropped_export_failed: AtomicU64,
}

/// Shared state backends (SPEC §15.4): whether each is reachable, `uapk_state_up{backend}`, and
/// how long its operations take, `uapk_state_duration_seconds{backend,op}`. `backend` and `op`
/// are fixed names given by the code (`redis`, `rate_limit`, …), never configuration.
#[derive(Default)]
pub struct StateMetrics {
    up: Mutex<BTreeMap<&'static str, bool>>,
    durations: Mutex<BTreeMap<(&'static str, &'static str), std::sync::Arc<Histogram>>>,
}

impl StateMetrics {
    /// Records whether `backend` answers (shown as 1 or 0).
    pub(crate) fn set_up(&self, backend: &'static str, up: bool) {
        self.up.lock().unwrap_or_else(|e| e.into_inner()).insert(backend, up);
    }

    /// Observes one operation `op` against `backend` that took `secs` (failed ones included).
    pub(crate) fn observe(&self, backend: &'static str, op: &'static str, secs: f64) {
        let h = self.durations.lock().unwrap_or_else(|e| e.into_inner()).entry((backend, op)).or_default().clone();
        h.observe(secs);
    }

    fn render(&self, out: &mut String) {
        let up = self.up.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !up.is_empty() {
            out.push_str(
                "# HELP uapk_state_up Whether the shared state backend answers (1) or not (0).\n# TYPE uapk_state_up gauge\n",
            );
            for (backend, up) in up {
                let _ = writeln!(out, "uapk_state_up{{backend=\"{backend}\"}} {}", u8::from(up));
            }
        }
        let durations = self.durations.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !durations.is_empty() {
            out.push_str(
                "# HELP uapk_state_duration_seconds Time of operations on the shared state backend, failed ones included.\n# TYPE uapk_state_duration_seconds histogram\n",
            );
            for ((backend, op), h) in durations {
                h.render_series(out, "uapk_state_duration_seconds", &format!("backend=\"{backend}\",op=\"{op}\""));
            }
        }
    }
}

/// Every metric the gateway exports.
#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<RequestLabels, u64>>,
    pub spans: std::sync::Arc<SpanStats>,
    /// Shared state backends (Redis rate limits, …).
    pub state: std::sync::Arc<StateMetrics>,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub audit_append: Histogram,
    pub config_reloads: Mutex<BTreeMap<&'static str, u64>>,
    pub leaf_cache_hits: AtomicU64,
    pub leaf_cache_misses: AtomicU64,
}

/// Values read at scrape time from other parts of the gateway.
pub(crate) struct Gauges {
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
    /// Counts a decided request. `agent` must already be a configured id, `unknown` or `-`
    /// (see `App::count` in `proxy`); `reason` is mapped onto the closed set here.
    pub(crate) fn request(
        &self,
        decision: &'static str,
        reason: &str,
        agent: &str,
        connector: Option<&str>,
        mode: &'static str,
    ) {
        let key = RequestLabels {
            decision,
            reason: reason_label(reason),
            agent: agent.to_string(),
            connector: connector.unwrap_or("none").to_string(),
            mode,
        };
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
    }

    pub(crate) fn reload(&self, result: &'static str) {
        *self.config_reloads.lock().unwrap_or_else(|e| e.into_inner()).entry(result).or_default() += 1;
    }

    pub(crate) fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP uapk_requests_total Requests decided, by decision, first reason code, agent, connector and policy mode.\n",
        );
        out.push_str("# TYPE uapk_requests_total counter\n");
        for (l, n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "uapk_requests_total{{decision=\"{}\",reason=\"{}\",agent=\"{}\",connector=\"{}\",mode=\"{}\"}} {n}",
                l.decision, l.reason, l.agent, l.connector, l.mode
            );
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
        let spans = &self.spans;
        out.push_str(
            "# HELP uapk_spans_exported_total Trace spans accepted by the OTLP collector.\n# TYPE uapk_spans_exported_total counter\n",
        );
        let _ = writeln!(out, "uapk_spans_exported_total {}", spans.exported.load(Ordering::Relaxed));
        out.push_str(
            "# HELP uapk_spans_dropped_total Trace spans lost: export queue full, or export failed or timed out.\n# TYPE uapk_spans_dropped_total counter\n",
        );
        let _ = writeln!(
            out,
            "uapk_spans_dropped_total{{reason=\"queue_full\"}} {}",
            spans.dropped_queue_full.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "uapk_spans_dropped_total{{reason=\"export_failed\"}} {}",
            spans.dropped_export_failed.load(Ordering::Relaxed)
        );
        self.state.render(&mut out);
        process_metrics(&mut out);
        let _ = writeln!(
            out,
            "# HELP uapk_build_info Build information.\n# TYPE uapk_build_info gauge\nuapk_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

/// `process_*` metrics (the names Prometheus client libraries use), from `/proc/self`; absent
/// where there is no procfs.
fn process_metrics(out: &mut String) {
    if let Some(cpu) = cpu_seconds() {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}"
        );
    }
    if let Some(rss) = resident_bytes() {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // Names only (no stat per entry); the listing's own descriptor is counted, as in other
        // exporters.
        let fds = dir.count();
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {fds}"
        );
    }
    if let Some(max) = max_fds() {
        let _ = writeln!(
            out,
            "# HELP process_max_fds Maximum number of open file descriptors.\n# TYPE process_max_fds gauge\nprocess_max_fds {max}"
        );
    }
}

/// utime + stime from `/proc/self/stat` (fields 14 and 15, in clock ticks).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second();
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

/// Resident pages (`/proc/self/statm`, second field) in bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// The soft open-file limit (`/proc/self/limits`).
fn max_fds() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_label_is_a_closed_set() {
        assert_eq!(reason_label("budget_exceeded"), "budget_exceeded");
        assert_eq!(reason_label("all_checks_passed"), "all_checks_passed");
        assert_eq!(reason_label("anything\"else"), "other");
        assert_eq!(reason_label(""), "other");
    }

    /// Every code docs/manifest.md lists is its own label (a code documented later but not
    /// added to `Code` would be charted as `other`).
    #[test]
    fn every_documented_reason_code_is_a_label() {
        let doc = include_str!("../docs/manifest.md");
        let section = doc.split("## Reason codes").nth(1).expect("docs/manifest.md has a Reason codes section");
        let section = section.split("\n## ").next().unwrap_or(section);
        let codes: Vec<&str> = section.split('`').skip(1).step_by(2).collect();
        assert!(codes.len() > 40, "{codes:?}");
        for c in codes {
            assert_eq!(reason_label(c), c, "{c} is documented but is no Code");
        }
    }

    #[test]
    fn state_metrics_carry_backend_and_op() {
        let m = StateMetrics::default();
        let mut out = String::new();
        m.render(&mut out);
        assert_eq!(out, "", "nothing before a backend reports");
        m.set_up("redis", true);
        m.observe("redis", "rate_limit", 0.003);
        m.set_up("redis", false);
        m.render(&mut out);
        assert!(out.contains("uapk_state_up{backend=\"redis\"} 0\n"), "{out}");
        assert!(
            out.contains("uapk_state_duration_seconds_bucket{backend=\"redis\",op=\"rate_limit\",le=\"0.0025\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("uapk_state_duration_seconds_bucket{backend=\"redis\",op=\"rate_limit\",le=\"0.005\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("uapk_state_duration_seconds_count{backend=\"redis\",op=\"rate_limit\"} 1\n"), "{out}");
        assert_eq!(out.matches("# TYPE uapk_state_duration_seconds histogram").count(), 1);
    }

    #[test]
    fn process_metrics_are_read_from_procfs() {
        let mut out = String::new();
        process_metrics(&mut out);
        let value = |name: &str| -> f64 {
            let line =
                out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} in {out}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_cpu_seconds_total") >= 0.0);
    }
}
