//! The refusal budget: how fast one agent's refusals are written to the audit log one by one.
//!
//! Every refusal is accounted for, but a flood of them must not grow the log without bound. Each
//! agent (or, for clients that could not be identified, each listener) has a token bucket
//! (`limits.refusals_per_agent`, burst `limits.refusals_burst`). Within it every refusal is its
//! own `decision` entry, as before. Beyond it the refusal is answered `429`
//! `refusals_rate_limited` and counted into that agent's pending `Summary`, which the runtime
//! writes as one `decision` entry at most once per second (`RefusalBudget::drain`): count,
//! first and last time, per-reason counts, the first `MAX_IDS` request ids, and the number and
//! SHA-256 of all of them, so every refused request id is either listed or provably counted.
//!
//! A flood must not hide what it carries (SPEC §16.2): the summary also lists each distinct
//! (reason code, method, host, connector, action) — a `Tuple` — with its count, its first
//! request id and that request's path, query and params, long strings cut as §14.8 cuts them.
//! Tuples are kept while they fit the 16 KiB entry; the rest are only counted (`dropped_tuples`),
//! by a 16-byte digest each, so memory per agent stays bounded.

use crate::audit::canonical::{CUT_STRING_BYTES, MAX_STRING_BYTES, utf8_prefix};
use crate::audit::{AuditError, Fields, MAX_ENTRY_BYTES};
use crate::policy::Code;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Request ids listed in one summary entry; beyond, they are counted and hashed only.
pub(crate) const MAX_IDS: usize = 100;

/// Distinct tuples left out of one summary that are told apart (by a 16-byte digest each);
/// beyond, each refusal of a tuple not listed counts as one more (`dropped_tuples` is then an
/// upper bound).
pub(crate) const MAX_DROPPED_KEYS: usize = 1024;

/// Bytes of an entry kept for the writer's own fields (`v`, `log`, `idx`, `ts`, `prev`).
const WRITER_BYTES: usize = 1024;

/// Whose budget a refusal is taken from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Refuser {
    /// An identified agent.
    Agent(String),
    /// Unidentified clients of one listener share its budget.
    Listener(&'static str),
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Within the budget: record it as its own `decision` entry.
    Record,
    /// Beyond the budget: counted into the summary; answer 429 with this `Retry-After`.
    Summarised { retry_after: Duration },
}

/// One refused request, as far as its summary needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refusal<'a> {
    pub request_id: &'a str,
    /// The refusal's own reason code.
    pub code: &'static str,
    pub method: &'a str,
    pub host: &'a str,
    pub connector: Option<&'a str>,
    pub action: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub params: &'a BTreeMap<String, String>,
}

impl Refusal<'_> {
    /// The tuple's identity: a digest of (code, method, host, connector, action), each field
    /// length-prefixed so no two tuples encode alike.
    fn key(&self) -> [u8; 16] {
        let mut h = Sha256::new();
        for part in [Some(self.code), Some(self.method), Some(self.host), self.connector, self.action] {
            match part {
                Some(p) => {
                    h.update((p.len() as u64).to_le_bytes());
                    h.update(p.as_bytes());
                }
                None => h.update(u64::MAX.to_le_bytes()),
            }
        }
        let d = h.finalize();
        let mut k = [0u8; 16];
        k.copy_from_slice(&d[..16]);
        k
    }
}

/// A string as an entry stores it: whole up to the §14.8 limit, else its first bytes then `…`,
/// with the full value's SHA-256 and length (so the whole string is never held).
#[derive(Debug, Clone)]
struct Text {
    kept: String,
    full: Option<([u8; 32], u64)>,
}

impl Text {
    fn of(s: &str) -> Text {
        if s.len() <= MAX_STRING_BYTES {
            return Text { kept: s.to_string(), full: None };
        }
        let mut kept = String::with_capacity(CUT_STRING_BYTES + 3);
        kept.push_str(utf8_prefix(s, CUT_STRING_BYTES));
        kept.push('…');
        Text { kept, full: Some((Sha256::digest(s.as_bytes()).into(), s.len() as u64)) }
    }

    fn json(&self, path: String, cuts: &mut Vec<(String, [u8; 32], u64)>) -> Value {
        if let Some((sha, len)) = self.full {
            cuts.push((path, sha, len));
        }
        json!(self.kept)
    }
}

/// One distinct (reason code, method, host, connector, action) of a summary's refusals.
#[derive(Debug, Clone)]
struct Tuple {
    code: &'static str,
    method: Text,
    host: Text,
    connector: Option<Text>,
    action: Option<Text>,
    count: u64,
    first_request_id: String,
    path: Text,
    query: Option<Text>,
    params: Vec<(String, Text)>,
    /// Bytes it takes in the entry (with its `truncated` lines), about.
    size: usize,
}

impl Tuple {
    fn new(r: &Refusal<'_>) -> Tuple {
        let mut t = Tuple {
            code: r.code,
            method: Text::of(r.method),
            host: Text::of(r.host),
            connector: r.connector.map(Text::of),
            action: r.action.map(Text::of),
            count: 0,
            first_request_id: r.request_id.to_string(),
            path: Text::of(r.path),
            query: r.query.map(Text::of),
            params: r.params.iter().map(|(k, v)| (k.clone(), Text::of(v))).collect(),
            size: 0,
        };
        let mut cuts = Vec::new();
        let v = t.json(0, &mut cuts);
        // The count's digits and the index may grow: a little slack.
        t.size = v.to_string().len() + 24 + cuts.iter().map(|(p, ..)| p.len() + 112).sum::<usize>();
        t
    }

    /// The tuple as listed at index `i` of `tuples`; its cut strings' paths go to `cuts`.
    fn json(&self, i: usize, cuts: &mut Vec<(String, [u8; 32], u64)>) -> Value {
        let opt = |t: &Option<Text>, name: &str, cuts: &mut Vec<_>| match t {
            Some(t) => t.json(format!("{i}.{name}"), cuts),
            None => Value::Null,
        };
        let params: Map<String, Value> =
            self.params.iter().map(|(k, v)| (k.clone(), v.json(format!("{i}.params.{k}"), cuts))).collect();
        json!({
            "code": self.code,
            "method": self.method.json(format!("{i}.method"), cuts),
            "host": self.host.json(format!("{i}.host"), cuts),
            "connector": opt(&self.connector, "connector", cuts),
            "action": opt(&self.action, "action", cuts),
            "count": self.count.to_string(),
            "first_request_id": self.first_request_id,
            "path": self.path.json(format!("{i}.path"), cuts),
            "query": opt(&self.query, "query", cuts),
            "params": params,
        })
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The refusals of one agent waiting to be written as a summary.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
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
    /// The distinct tuples kept, in the order first seen, and where each is by its key.
    tuples: Vec<Tuple>,
    index: HashMap<[u8; 16], usize>,
    tuple_bytes: usize,
    /// Keys of the tuples left out (up to [`MAX_DROPPED_KEYS`]), and the refusals of tuples
    /// left out past that bound.
    dropped: HashSet<[u8; 16]>,
    dropped_past_bound: u64,
}

impl Summary {
    fn new(refuser: Refuser, ts: String) -> Summary {
        Summary {
            refuser,
            count: 0,
            first_ts: ts.clone(),
            last_ts: ts,
            request_ids: Vec::new(),
            ids_digest: Sha256::new(),
            reasons: BTreeMap::new(),
            tuples: Vec::new(),
            index: HashMap::new(),
            tuple_bytes: 0,
            dropped: HashSet::new(),
            dropped_past_bound: 0,
        }
    }

    /// Counts `r` into its tuple: a new tuple is kept while the kept ones fit an entry.
    fn count_tuple(&mut self, r: &Refusal<'_>) {
        let key = r.key();
        if let Some(&i) = self.index.get(&key) {
            self.tuples[i].count += 1;
            return;
        }
        if self.dropped.contains(&key) {
            return;
        }
        // (No tuple is smaller than this: nothing more can fit.)
        if self.tuple_bytes + 160 <= MAX_ENTRY_BYTES {
            let t = Tuple::new(r);
            if self.tuple_bytes + t.size <= MAX_ENTRY_BYTES {
                self.tuple_bytes += t.size;
                self.index.insert(key, self.tuples.len());
                self.tuples.push(Tuple { count: 1, ..t });
                return;
            }
        }
        if self.dropped.len() < MAX_DROPPED_KEYS {
            self.dropped.insert(key);
        } else {
            self.dropped_past_bound += 1;
        }
    }

    /// The `decision` entry this summary is written as: its own fields, then as many tuples as
    /// fit the entry bound (with the writer's fields); the others are counted in `dropped_tuples`.
    pub(crate) fn entry(&self) -> Result<Fields, AuditError> {
        let mut f = Fields::new();
        f.str("kind", "decision").str("decision", "deny");
        match &self.refuser {
            Refuser::Agent(a) => f.str("agent", a),
            Refuser::Listener(l) => f.str("listener", l),
        };
        f.value(
            "reasons",
            &json!([{
                "code": Code::RefusalsRateLimited,
                "message": format!("{} refusals beyond limits.refusals_per_agent, summarised", self.count),
            }]),
        )?;
        // The log holds no JSON numbers: integers are decimal strings.
        f.int("count", self.count).str("first_ts", &self.first_ts).str("last_ts", &self.last_ts);
        f.value("request_ids", &json!(self.request_ids))?;
        f.int("request_ids_omitted", self.count.saturating_sub(self.request_ids.len() as u64));
        f.str("request_ids_sha256", &hex::encode(self.ids_digest.clone().finalize()));
        let counts: Map<String, Value> =
            self.reasons.iter().map(|(k, v)| (k.to_string(), json!(v.to_string()))).collect();
        f.map("reason_counts", &counts)?;
        let mut own = Vec::new();
        f.join(&[], &mut own);
        // `"dropped_tuples":"…"`, `"tuples":[]` and the `truncated` map's braces.
        let mut room = MAX_ENTRY_BYTES.saturating_sub(WRITER_BYTES + own.len() + 80);
        let (mut listed, mut cuts) = (Vec::with_capacity(self.tuples.len()), Vec::new());
        let mut left_out = 0u64;
        for t in &self.tuples {
            let mut these = Vec::new();
            let v = t.json(listed.len(), &mut these);
            let size = v.to_string().len() + 1 + these.iter().map(|(p, ..)| p.len() + 110).sum::<usize>();
            if size > room {
                left_out += 1;
                continue;
            }
            room -= size;
            listed.push(v);
            cuts.extend(these);
        }
        f.value_precut("tuples", &Value::Array(listed), &cuts)?;
        f.int("dropped_tuples", left_out + self.dropped.len() as u64 + self.dropped_past_bound);
        Ok(f)
    }
}

/// The per-agent refusal budgets and pending summaries.
#[derive(Debug)]
pub(crate) struct RefusalBudget {
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
    crate::clock::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl RefusalBudget {
    pub(crate) fn new(per_second: f64, burst: u32) -> RefusalBudget {
        RefusalBudget {
            per_second: if per_second.is_finite() && per_second > 0.0 { per_second } else { 1.0 },
            burst: f64::from(burst.max(1)),
            state: Mutex::new(State::default()),
        }
    }

    /// Takes one refusal from `refuser`'s budget; beyond it, counts the refusal `r` into the
    /// pending summary.
    pub(crate) fn admit(&self, refuser: &Refuser, r: &Refusal<'_>, now: Instant) -> Admission {
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
        let s = st.pending.entry(refuser.clone()).or_insert_with(|| Summary::new(refuser.clone(), ts.clone()));
        s.count += 1;
        s.last_ts = ts;
        if s.request_ids.len() < MAX_IDS {
            s.request_ids.push(r.request_id.to_string());
        }
        s.ids_digest.update(r.request_id.as_bytes());
        s.ids_digest.update(b"\n");
        *s.reasons.entry(r.code).or_insert(0) += 1;
        s.count_tuple(r);
        Admission::Summarised { retry_after: Duration::from_secs_f64(wait.min(3600.0)) }
    }

    /// Takes the pending summaries (at most one per agent) to be written.
    pub(crate) fn drain(&self) -> Vec<Summary> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut st.pending).into_values().collect()
    }

    /// Forgets full buckets (they would be created full again), keeping memory bounded.
    pub(crate) fn sweep(&self, now: Instant) {
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

    static NO_PARAMS: BTreeMap<String, String> = BTreeMap::new();

    /// A refusal on a base-URL path of connector `shop`.
    fn r<'a>(request_id: &'a str, code: &'static str) -> Refusal<'a> {
        Refusal {
            request_id,
            code,
            method: "GET",
            host: "127.0.0.1",
            connector: Some("shop"),
            action: None,
            path: "/v1/nothing",
            query: None,
            params: &NO_PARAMS,
        }
    }

    /// The entry as the log stores it (without the writer's own fields).
    fn stored(s: &Summary) -> Value {
        let mut out = Vec::new();
        s.entry().unwrap().join(&[], &mut out);
        assert!(out.len() + WRITER_BYTES <= MAX_ENTRY_BYTES, "{} bytes", out.len());
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn the_burst_is_recorded_then_refusals_are_summarised() {
        let b = RefusalBudget::new(10.0, 5);
        let t0 = crate::clock::instant();
        for i in 0..5 {
            assert_eq!(b.admit(&agent("a1"), &r(&format!("r{i}"), "route_not_allowed"), t0), Admission::Record);
        }
        match b.admit(&agent("a1"), &r("r5", "route_not_allowed"), t0) {
            Admission::Summarised { retry_after } => assert_eq!(retry_after, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
        // Another agent has its own budget.
        assert_eq!(b.admit(&agent("a2"), &r("x", "route_not_allowed"), t0), Admission::Record);
        // Tokens come back at the configured rate.
        assert_eq!(
            b.admit(&agent("a1"), &r("r6", "route_not_allowed"), t0 + Duration::from_millis(150)),
            Admission::Record
        );
    }

    #[test]
    fn a_summary_lists_bounded_ids_and_hashes_all_of_them() {
        let b = RefusalBudget::new(1.0, 1);
        let t0 = crate::clock::instant();
        assert_eq!(b.admit(&agent("a1"), &r("first", "route_not_allowed"), t0), Admission::Record);
        let ids: Vec<String> = (0..(MAX_IDS + 20)).map(|i| format!("id{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let code = if i % 2 == 0 { "route_not_allowed" } else { "host_not_allowed" };
            assert!(matches!(b.admit(&agent("a1"), &r(id, code), t0), Admission::Summarised { .. }));
        }
        let drained = b.drain();
        assert_eq!(drained.len(), 1);
        let e = stored(&drained[0]);
        assert_eq!(e["kind"], "decision");
        assert_eq!(e["decision"], "deny");
        assert_eq!(e["agent"], "a1");
        assert_eq!(e["reasons"][0]["code"], Code::RefusalsRateLimited.as_str());
        assert_eq!(e["count"], json!((MAX_IDS + 20).to_string()));
        assert_eq!(e["request_ids"].as_array().unwrap().len(), MAX_IDS);
        assert_eq!(e["request_ids_omitted"], json!("20"));
        assert_eq!(e["request_ids_sha256"], json!(ids_sha256(ids.iter().map(String::as_str))));
        assert_eq!(e["reason_counts"]["route_not_allowed"], json!("60"));
        assert_eq!(e["reason_counts"]["host_not_allowed"], json!("60"));
        assert!(b.drain().is_empty(), "a summary is written once");
    }

    #[test]
    fn a_summary_keeps_each_tuple_with_its_first_request_and_cuts_long_strings() {
        let b = RefusalBudget::new(1.0, 1);
        let t0 = crate::clock::instant();
        assert_eq!(b.admit(&agent("a1"), &r("first", "route_not_allowed"), t0), Admission::Record);
        for i in 0..50 {
            b.admit(&agent("a1"), &r(&format!("junk{i}"), "route_not_allowed"), t0);
        }
        let secret = format!("secret={}", "s".repeat(3000));
        let exfil = Refusal {
            request_id: "exfil-1",
            code: "host_not_allowed",
            method: "POST",
            host: "exfil.attacker.example",
            connector: None,
            action: None,
            path: "/collect",
            query: Some(&secret),
            params: &NO_PARAMS,
        };
        b.admit(&agent("a1"), &exfil, t0);
        b.admit(&agent("a1"), &Refusal { request_id: "exfil-2", path: "/other", ..exfil }, t0);
        let params: BTreeMap<String, String> =
            [("counterparty".to_string(), "cus_blocked".to_string()), ("amount".into(), "10.00".into())].into();
        let refund = Refusal {
            request_id: "refund-1",
            code: "counterparty_denied",
            method: "POST",
            host: "127.0.0.1",
            connector: Some("shop"),
            action: Some("payment.refund"),
            path: "/v1/refunds",
            query: None,
            params: &params,
        };
        b.admit(&agent("a1"), &refund, t0);
        let e = stored(&b.drain().remove(0));
        let tuples = e["tuples"].as_array().unwrap();
        assert_eq!(tuples.len(), 3, "{e}");
        assert_eq!(e["dropped_tuples"], "0");
        assert_eq!(tuples[0]["count"], "50");
        assert_eq!(tuples[0]["first_request_id"], "junk0");
        // Same code, method, host, connector and action: one tuple, its first request's path.
        let x = &tuples[1];
        assert_eq!(
            (x["host"].as_str(), x["path"].as_str(), x["count"].as_str()),
            (Some("exfil.attacker.example"), Some("/collect"), Some("2"))
        );
        assert_eq!((x["connector"].clone(), x["first_request_id"].as_str()), (Value::Null, Some("exfil-1")));
        assert_eq!(x["query"], format!("{}…", &secret[..256]).as_str());
        assert_eq!(e["truncated"]["tuples.1.query"]["sha256"], hex::encode(Sha256::digest(secret.as_bytes())));
        assert_eq!(e["truncated"]["tuples.1.query"]["len"], "3007");
        let p = &tuples[2];
        assert_eq!(p["code"], "counterparty_denied");
        assert_eq!(p["action"], "payment.refund");
        assert_eq!(p["params"], json!({"amount": "10.00", "counterparty": "cus_blocked"}));
    }

    #[test]
    fn tuples_beyond_the_entry_bound_are_counted_as_dropped() {
        let b = RefusalBudget::new(1.0, 1);
        let t0 = crate::clock::instant();
        b.admit(&agent("a1"), &r("first", "route_not_allowed"), t0);
        let hosts: Vec<String> = (0..3000).map(|i| format!("h{i}.{}.example", "x".repeat(200))).collect();
        for (i, h) in hosts.iter().enumerate() {
            let id = format!("id{i}");
            // Each host twice: a dropped tuple is counted once.
            for _ in 0..2 {
                b.admit(&agent("a1"), &Refusal { host: h, ..r(&id, "host_not_allowed") }, t0);
            }
        }
        let s = b.drain().remove(0);
        assert!(s.dropped.len() <= MAX_DROPPED_KEYS && s.tuple_bytes <= MAX_ENTRY_BYTES, "memory stays bounded");
        let e = stored(&s);
        let listed = e["tuples"].as_array().unwrap();
        assert!(listed.len() > 10, "{}", listed.len());
        assert!(listed.iter().all(|t| t["count"] == "2"));
        let dropped: u64 = e["dropped_tuples"].as_str().unwrap().parse().unwrap();
        // Exact up to MAX_DROPPED_KEYS distinct keys, then an upper bound (one per refusal).
        let kept = s.tuples.len();
        let past = 3000 - kept - MAX_DROPPED_KEYS;
        assert_eq!(dropped as usize, (kept - listed.len()) + MAX_DROPPED_KEYS + 2 * past);
        assert_eq!(e["count"], "6000");
    }

    #[test]
    fn unidentified_clients_share_their_listener_budget() {
        let b = RefusalBudget::new(1.0, 2);
        let t0 = crate::clock::instant();
        let proxy = Refuser::Listener("proxy");
        assert_eq!(b.admit(&proxy, &r("a", "capability_token_required"), t0), Admission::Record);
        assert_eq!(b.admit(&proxy, &r("b", "capability_token_required"), t0), Admission::Record);
        assert!(matches!(b.admit(&proxy, &r("c", "capability_token_required"), t0), Admission::Summarised { .. }));
        assert_eq!(b.admit(&Refuser::Listener("transparent"), &r("d", "host_not_allowed"), t0), Admission::Record);
        let e = stored(&b.drain().remove(0));
        assert_eq!(e["listener"], "proxy");
        assert!(e.get("agent").is_none());
    }

    #[test]
    fn sweeping_keeps_only_buckets_that_are_not_full() {
        let b = RefusalBudget::new(10.0, 2);
        let t0 = crate::clock::instant();
        b.admit(&agent("a1"), &r("x", "route_not_allowed"), t0);
        b.sweep(t0);
        assert_eq!(b.state.lock().unwrap().buckets.len(), 1);
        b.sweep(t0 + Duration::from_secs(1));
        assert!(b.state.lock().unwrap().buckets.is_empty());
    }
}
