//! The refusal budget: how fast one agent's refusals are written to the audit log one by one.
//!
//! Every refusal is accounted for, but a flood of them must not grow the log without bound. Each
//! agent (or, for clients that could not be identified, each listener) has a token bucket
//! (`limits.refusals_per_agent`, burst `limits.refusals_burst`). Within it every refusal is its
//! own `decision` entry, as before. Beyond it the refusal is answered `429`
//! `refusals_rate_limited` and counted into that agent's pending [`Summary`], which the runtime
//! writes as one `decision` entry at most once per second ([`RefusalBudget::drain`]): count,
//! first and last time, per-reason counts, the first [`MAX_IDS`] request ids, and the number and
//! SHA-256 of all of them, so every refused request id is either listed or provably counted.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Request ids listed in one summary entry; beyond, they are counted and hashed only.
pub const MAX_IDS: usize = 100;

/// Reason code of a refusal answered beyond the budget.
pub const RATE_LIMITED: &str = "refusals_rate_limited";

/// Whose budget a refusal is taken from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refuser {
    /// An identified agent.
    Agent(String),
    /// Unidentified clients of one listener share its budget.
    Listener(&'static str),
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the budget: record it as its own `decision` entry.
    Record,
    /// Beyond the budget: counted into the summary; answer 429 with this `Retry-After`.
    Summarised { retry_after: Duration },
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The refusals of one agent waiting to be written as a summary.
#[derive(Debug, Clone)]
pub struct Summary {
    pub refuser: Refuser,
    pub count: u64,
    pub first_ts: String,
    pub last_ts: String,
    /// The first [`MAX_IDS`] request ids.
    pub request_ids: Vec<String>,
    /// SHA-256 over every request id of the summary, each followed by `\n`, in order.
    ids_digest: Sha256,
    /// Count per reason code of the refusals themselves.
    pub reasons: BTreeMap<&'static str, u64>,
}

impl Summary {
    /// The `decision` entry this summary is written as.
    pub fn entry(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("kind".into(), json!("decision"));
        m.insert("decision".into(), json!("deny"));
        match &self.refuser {
            Refuser::Agent(a) => {
                m.insert("agent".into(), json!(a));
            }
            Refuser::Listener(l) => {
                m.insert("listener".into(), json!(l));
            }
        }
        m.insert(
            "reasons".into(),
            json!([{
                "code": RATE_LIMITED,
                "message": format!("{} refusals beyond limits.refusals_per_agent, summarised", self.count),
            }]),
        );
        // The log holds no JSON numbers: integers are decimal strings.
        m.insert("count".into(), json!(self.count.to_string()));
        m.insert("first_ts".into(), json!(self.first_ts));
        m.insert("last_ts".into(), json!(self.last_ts));
        m.insert("request_ids".into(), json!(self.request_ids));
        let omitted = self.count.saturating_sub(self.request_ids.len() as u64);
        m.insert("request_ids_omitted".into(), json!(omitted.to_string()));
        m.insert("request_ids_sha256".into(), json!(hex::encode(self.ids_digest.clone().finalize())));
        let counts: Map<String, Value> =
            self.reasons.iter().map(|(k, v)| (k.to_string(), json!(v.to_string()))).collect();
        m.insert("reason_counts".into(), Value::Object(counts));
        m
    }
}

/// The per-agent refusal budgets and pending summaries.
#[derive(Debug)]
pub struct RefusalBudget {
    per_second: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    buckets: HashMap<Refuser, Bucket>,
    pending: BTreeMap<Refuser, Summary>,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl RefusalBudget {
    pub fn new(per_second: f64, burst: u32) -> RefusalBudget {
        RefusalBudget {
            per_second: if per_second.is_finite() && per_second > 0.0 { per_second } else { 1.0 },
            burst: f64::from(burst.max(1)),
            state: Mutex::new(State::default()),
        }
    }

    /// Takes one refusal from `refuser`'s budget; beyond it, counts the refusal (`request_id`,
    /// its reason `code`) into the pending summary.
    pub fn admit(&self, refuser: &Refuser, request_id: &str, code: &'static str, now: Instant) -> Admission {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = st.buckets.entry(refuser.clone()).or_insert(Bucket { tokens: self.burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Admission::Record;
        }
        let wait = ((1.0 - bucket.tokens) / self.per_second).ceil().max(1.0);
        let ts = now_rfc3339();
        let s = st.pending.entry(refuser.clone()).or_insert_with(|| Summary {
            refuser: refuser.clone(),
            count: 0,
            first_ts: ts.clone(),
            last_ts: ts.clone(),
            request_ids: Vec::new(),
            ids_digest: Sha256::new(),
            reasons: BTreeMap::new(),
        });
        s.count += 1;
        s.last_ts = ts;
        if s.request_ids.len() < MAX_IDS {
            s.request_ids.push(request_id.to_string());
        }
        s.ids_digest.update(request_id.as_bytes());
        s.ids_digest.update(b"\n");
        *s.reasons.entry(code).or_insert(0) += 1;
        Admission::Summarised { retry_after: Duration::from_secs_f64(wait.min(3600.0)) }
    }

    /// Takes the pending summaries (at most one per agent) to be written.
    pub fn drain(&self) -> Vec<Summary> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut st.pending).into_values().collect()
    }

    /// Forgets full buckets (they would be created full again), keeping memory bounded.
    pub fn sweep(&self, now: Instant) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (rate, burst) = (self.per_second, self.burst);
        st.buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
    }
}

/// SHA-256 over request ids as a summary's `request_ids_sha256` is computed (each id followed
/// by `\n`), for auditors checking a list of ids against a summary.
pub fn ids_sha256<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(a: &str) -> Refuser {
        Refuser::Agent(a.into())
    }

    #[test]
    fn the_burst_is_recorded_then_refusals_are_summarised() {
        let b = RefusalBudget::new(10.0, 5);
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(b.admit(&agent("a1"), &format!("r{i}"), "route_not_allowed", t0), Admission::Record);
        }
        match b.admit(&agent("a1"), "r5", "route_not_allowed", t0) {
            Admission::Summarised { retry_after } => assert_eq!(retry_after, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
        // Another agent has its own budget.
        assert_eq!(b.admit(&agent("a2"), "x", "route_not_allowed", t0), Admission::Record);
        // Tokens come back at the configured rate.
        assert_eq!(
            b.admit(&agent("a1"), "r6", "route_not_allowed", t0 + Duration::from_millis(150)),
            Admission::Record
        );
    }

    #[test]
    fn a_summary_lists_bounded_ids_and_hashes_all_of_them() {
        let b = RefusalBudget::new(1.0, 1);
        let t0 = Instant::now();
        assert_eq!(b.admit(&agent("a1"), "first", "route_not_allowed", t0), Admission::Record);
        let ids: Vec<String> = (0..(MAX_IDS + 20)).map(|i| format!("id{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let code = if i % 2 == 0 { "route_not_allowed" } else { "host_not_allowed" };
            assert!(matches!(b.admit(&agent("a1"), id, code, t0), Admission::Summarised { .. }));
        }
        let drained = b.drain();
        assert_eq!(drained.len(), 1);
        let e = drained[0].entry();
        assert_eq!(e["kind"], "decision");
        assert_eq!(e["decision"], "deny");
        assert_eq!(e["agent"], "a1");
        assert_eq!(e["reasons"][0]["code"], RATE_LIMITED);
        assert_eq!(e["count"], json!((MAX_IDS + 20).to_string()));
        assert_eq!(e["request_ids"].as_array().unwrap().len(), MAX_IDS);
        assert_eq!(e["request_ids_omitted"], json!("20"));
        assert_eq!(e["request_ids_sha256"], json!(ids_sha256(ids.iter().map(String::as_str))));
        assert_eq!(e["reason_counts"]["route_not_allowed"], json!("60"));
        assert_eq!(e["reason_counts"]["host_not_allowed"], json!("60"));
        assert!(b.drain().is_empty(), "a summary is written once");
    }

    #[test]
    fn unidentified_clients_share_their_listener_budget() {
        let b = RefusalBudget::new(1.0, 2);
        let t0 = Instant::now();
        let proxy = Refuser::Listener("proxy");
        assert_eq!(b.admit(&proxy, "a", "capability_token_required", t0), Admission::Record);
        assert_eq!(b.admit(&proxy, "b", "capability_token_required", t0), Admission::Record);
        assert!(matches!(b.admit(&proxy, "c", "capability_token_required", t0), Admission::Summarised { .. }));
        assert_eq!(b.admit(&Refuser::Listener("transparent"), "d", "host_not_allowed", t0), Admission::Record);
        let e = b.drain().remove(0).entry();
        assert_eq!(e["listener"], "proxy");
        assert!(e.get("agent").is_none());
    }

    #[test]
    fn sweeping_keeps_only_buckets_that_are_not_full() {
        let b = RefusalBudget::new(10.0, 2);
        let t0 = Instant::now();
        b.admit(&agent("a1"), "x", "route_not_allowed", t0);
        b.sweep(t0);
        assert_eq!(b.state.lock().unwrap().buckets.len(), 1);
        b.sweep(t0 + Duration::from_secs(1));
        assert!(b.state.lock().unwrap().buckets.is_empty());
    }
}
