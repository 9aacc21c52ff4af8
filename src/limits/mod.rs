//! Budgets (SPEC §8 step 8) and rate limits (step 9).
//!
//! Budget counters live in memory behind one lock, so a reservation is a single atomic
//! check-and-increment: N concurrent requests against 1 remaining slot forward exactly one.
//! They survive restarts because they are rebuilt from the audit log, which holds every
//! committed ALLOW decision durably before it is forwarded: the log is the only source of truth.
//! Every counted decision increments the counters of all window/scope combinations (also for
//! agents whose manifest has no budget yet), so a budget added by a reload sees the whole
//! current window. What counts is decided by one function, [`counts_toward_budgets`], at
//! runtime and when rebuilding alike; [`recorded_spend`] reads both what a `decision` entry
//! spends and the LLM tokens an `outcome` entry records ([`usage_tokens`]).
//!
//! Rate limits are GCRA buckets checked all before any is taken ([`RateLimiters::check`]).
//! How fast one agent's refusals are recorded is bounded by [`refusals`].

pub mod in_flight;
pub mod refusals;

use crate::config::{Manifest, RateLimit, Scope, Window};
use crate::policy::Reason;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WINDOWS: [Window; 2] = [Window::Day, Window::Hour];
const SCOPES: [Scope; 3] = [Scope::Agent, Scope::Connector, Scope::Action];

/// (window, start of the window in Unix seconds, scope): one agent's counters of one window,
/// by scope value.
type WindowKey = (Window, i64, Scope);

fn window_start(at: i64, w: Window) -> i64 {
    at.div_euclid(w.seconds()) * w.seconds()
}

/// One agent's counters. Two levels, so counting an action that has been seen before in its
/// window looks keys up by reference and allocates nothing.
#[derive(Debug, Default)]
struct AgentCounters {
    windows: HashMap<WindowKey, HashMap<String, Counter>>,
}

#[derive(Debug, Default, Clone)]
struct Counter {
    count: u64,
    spend: BTreeMap<String, Decimal>,
    /// LLM tokens of recorded usage (SPEC §14.5).
    tokens: u64,
}

/// What one action spends: its identity and optional amount.
#[derive(Debug, Clone)]
pub struct Spend {
    pub agent: String,
    pub connector: String,
    pub action: String,
    /// Amount and upper-case currency.
    pub amount: Option<(Decimal, String)>,
    /// Unix seconds.
    pub at: i64,
}

impl Spend {
    fn scope_value(&self, s: Scope) -> &str {
        match s {
            Scope::Agent => &self.agent,
            Scope::Connector => &self.connector,
            Scope::Action => &self.action,
        }
    }
}

/// LLM tokens one request used: counted once its `outcome` entry (which records the usage) is
/// in the log.
#[derive(Debug, Clone)]
pub struct TokenUse {
    pub agent: String,
    pub connector: String,
    pub action: String,
    pub tokens: u64,
    /// Unix seconds.
    pub at: i64,
}

/// What one committed entry adds to the budget counters.
#[derive(Debug, Clone)]
pub enum Counted {
    /// An allowed action (and its amount).
    Action(Spend),
    /// LLM tokens of a response.
    Tokens(TokenUse),
}

/// The one rule of what budgets count, applied both when a request is decided and when the
/// counters are rebuilt from the log, so a restart never changes a count: an ALLOW decision of
/// a route's action (SPEC §8 step 8: "only forwarded ALLOWs count"). Not counted: refusals and
/// escalations, also in `dry_run` (forwarded, but not as ALLOWs); and tunnel authorisations
/// (a CONNECT, or a TLS connection caught by the transparent listener), which match no route
/// and are not actions: the requests inside an intercepted tunnel are decided, and counted,
/// one by one like any other, while a `passthrough` tunnel is bounded by its connector's allow
/// lists, not by budgets.
pub fn counts_toward_budgets(decision: &str, route: Option<&str>) -> bool {
    decision == "allow" && route.is_some()
}

/// The tokens a recorded `usage` object counts toward token budgets (SPEC §14.5): its
/// `total_tokens` (a decimal string in the log, as every integer there). Unknown usage
/// (`null`) counts nothing. Used when the outcome entry is written and when it is read back.
pub fn usage_tokens(usage: &serde_json::Value) -> Option<u64> {
    let t = &usage["total_tokens"];
    t.as_u64().or_else(|| t.as_str().and_then(|s| s.parse().ok())).filter(|&n| n > 0)
}

/// What a committed entry adds to the budget counters, if anything: a `decision` entry what it
/// spends (when it counts, see [`counts_toward_budgets`]), an `outcome` entry the tokens of its
/// recorded usage ([`usage_tokens`]). `fallback_at` dates an entry whose `ts` cannot be read.
pub fn recorded_spend(entry: &serde_json::Value, fallback_at: i64) -> Option<Counted> {
    let at = entry["ts"]
        .as_str()
        .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
        .map_or(fallback_at, |t| t.unix_timestamp());
    let s = |k: &str| entry[k].as_str().unwrap_or_default().to_string();
    if entry["kind"] == "outcome" {
        let tokens = usage_tokens(&entry["usage"])?;
        return Some(Counted::Tokens(TokenUse {
            agent: s("agent"),
            connector: s("connector"),
            action: s("action"),
            tokens,
            at,
        }));
    }
    if entry["kind"] != "decision" || !counts_toward_budgets(entry["decision"].as_str()?, entry["route"].as_str()) {
        return None;
    }
    let amount = entry["params"]["amount"].as_str().and_then(|a| a.parse().ok());
    let currency = entry["params"]["currency"].as_str().unwrap_or_default().to_string();
    Some(Counted::Action(Spend {
        agent: s("agent"),
        connector: s("connector"),
        action: s("action"),
        amount: amount.map(|a| (a, currency)),
        at,
    }))
}

/// Budget counters for every agent.
#[derive(Debug, Default)]
pub struct Budgets {
    counters: Arc<Mutex<HashMap<String, AgentCounters>>>,
}

/// A handle that counts LLM tokens into [`Budgets`] when a response's outcome is recorded.
#[derive(Debug, Clone)]
pub struct TokenCounter {
    counters: Arc<Mutex<HashMap<String, AgentCounters>>>,
}

impl TokenCounter {
    /// Counts the tokens of a response whose outcome entry was handed to the log.
    pub fn record(&self, t: &TokenUse) {
        let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        add(&mut map, &t.agent, [&t.agent, &t.connector, &t.action], t.at, |c| {
            c.tokens = c.tokens.saturating_add(t.tokens);
        });
    }
}

/// Applies `f` to the counter of every window/scope combination of one (agent, connector,
/// action) at `at`, creating counters as needed; a new window forgets the one it replaced.
fn add(map: &mut HashMap<String, AgentCounters>, agent: &str, values: [&str; 3], at: i64, f: impl Fn(&mut Counter)) {
    if !map.contains_key(agent) {
        map.insert(agent.to_string(), AgentCounters::default());
    }
    let Some(counters) = map.get_mut(agent) else { return };
    for w in WINDOWS {
        let start = window_start(at, w);
        if !counters.windows.contains_key(&(w, start, Scope::Agent)) {
            // A new window of this kind began: the ones it replaced are over.
            counters.windows.retain(|&(kw, kstart, _), _| kw != w || kstart + kw.seconds() > at);
        }
        for (scope, value) in SCOPES.into_iter().zip(values) {
            let values = counters.windows.entry((w, start, scope)).or_default();
            if !values.contains_key(value) {
                values.insert(value.to_string(), Counter::default());
            }
            if let Some(c) = values.get_mut(value) {
                f(c);
            }
        }
    }
}

/// A budget slot taken by a request that has not been forwarded yet. Hand it back with
/// [`Budgets::release`] if the request is refused later (rate limit, audit failure, escalation).
#[must_use]
#[derive(Debug)]
pub struct Reservation {
    spend: Option<Spend>,
}

/// The result of a reservation attempt.
#[derive(Debug)]
pub enum BudgetCheck {
    /// Reserved; `threshold` carries `budget_threshold_reached` when an escalation percentage is
    /// reached (the caller escalates unless an override lifts it).
    Reserved { reservation: Reservation, threshold: Option<Reason> },
    /// A budget is spent: `budget_exceeded`.
    Exceeded(Reason),
}

impl Budgets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `spend` in every window/scope combination (`sign` > 0), or takes it back.
    /// Sums saturate: an amount no budget caps must not be able to overflow a counter.
    fn apply(map: &mut HashMap<String, AgentCounters>, spend: &Spend, sign: i8) {
        if sign < 0 {
            // Only what was counted is taken back; a window forgotten since stays forgotten.
            let Some(agent) = map.get_mut(spend.agent.as_str()) else { return };
            for w in WINDOWS {
                for scope in SCOPES {
                    let c = agent
                        .windows
                        .get_mut(&(w, window_start(spend.at, w), scope))
                        .and_then(|values| values.get_mut(spend.scope_value(scope)));
                    if let Some(c) = c {
                        c.count = c.count.saturating_sub(1);
                        if let Some((amt, cur)) = &spend.amount
                            && let Some(s) = c.spend.get_mut(cur)
                        {
                            *s = s.saturating_sub(*amt);
                        }
                    }
                }
            }
            return;
        }
        add(map, &spend.agent, [&spend.agent, &spend.connector, &spend.action], spend.at, |c| {
            c.count = c.count.saturating_add(1);
            if let Some((amt, cur)) = &spend.amount {
                match c.spend.get_mut(cur) {
                    Some(s) => *s = s.saturating_add(*amt),
                    None => {
                        c.spend.insert(cur.clone(), *amt);
                    }
                }
            }
        });
    }

    /// Counts what a committed entry recorded (used when rebuilding from the log; see
    /// [`recorded_spend`]).
    pub fn record(&self, counted: &Counted) {
        match counted {
            Counted::Action(spend) => {
                let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
                Self::apply(&mut map, spend, 1);
            }
            Counted::Tokens(t) => self.token_counter().record(t),
        }
    }

    /// A handle for counting tokens as responses end.
    pub fn token_counter(&self) -> TokenCounter {
        TokenCounter { counters: self.counters.clone() }
    }

    /// Atomically checks every budget of `manifest` against `spend` and, if none is spent,
    /// counts it (in every window and scope, also without budgets: see the module comment).
    pub fn reserve(&self, manifest: &Manifest, spend: Spend) -> BudgetCheck {
        let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut threshold = None;
        let agent = map.get(spend.agent.as_str());
        for b in &manifest.policy.budgets {
            let value = spend.scope_value(b.scope);
            let used = agent
                .and_then(|a| a.windows.get(&(b.window, window_start(spend.at, b.window), b.scope)))
                .and_then(|values| values.get(value));
            let count = used.map_or(0, |c| c.count);
            let label = || format!("{} budget for {} {}", b.window.as_str(), b.scope.as_str(), value);
            if let Some(max) = b.max_actions {
                if count >= max {
                    return BudgetCheck::Exceeded(Reason::new(
                        "budget_exceeded",
                        format!("{} is spent: {count}/{max} actions", label()),
                    ));
                }
                if let Some(pct) = b.escalate_at_percent
                    && threshold.is_none()
                    && u128::from(count) * 100 >= u128::from(max) * u128::from(pct)
                {
                    threshold = Some(Reason::new(
                        "budget_threshold_reached",
                        format!("{} reached {pct}%: {count}/{max} actions", label()),
                    ));
                }
            }
            if let Some(max) = b.max_tokens {
                let tokens = used.map_or(0, |c| c.tokens);
                if tokens >= max {
                    return BudgetCheck::Exceeded(Reason::new(
                        "budget_exceeded",
                        format!("{} is spent: {tokens}/{max} tokens", label()),
                    ));
                }
                if let Some(pct) = b.escalate_at_percent
                    && threshold.is_none()
                    && u128::from(tokens) * 100 >= u128::from(max) * u128::from(pct)
                {
                    threshold = Some(Reason::new(
                        "budget_threshold_reached",
                        format!("{} reached {pct}%: {tokens}/{max} tokens", label()),
                    ));
                }
            }
            if let Some((amt, cur)) = &spend.amount
                && let Some(max) = b.max_spend.get(cur)
            {
                let spent = used.and_then(|c| c.spend.get(cur)).copied().unwrap_or_default();
                // Fail closed: a sum too large for a decimal exceeds any cap.
                let Some(total) = spent.checked_add(*amt).filter(|t| t <= max) else {
                    return BudgetCheck::Exceeded(Reason::new(
                        "budget_exceeded",
                        format!("{} would be exceeded: {spent} + {amt} > {max} {cur}", label()),
                    ));
                };
                if let Some(pct) = b.escalate_at_percent
                    && threshold.is_none()
                {
                    let pct_dec = Decimal::from(pct);
                    let at = max
                        .checked_mul(pct_dec)
                        .map(|m| m / Decimal::from(100))
                        .unwrap_or_else(|| *max / Decimal::from(100) * pct_dec);
                    if total >= at {
                        threshold = Some(Reason::new(
                            "budget_threshold_reached",
                            format!("{} reached {pct}%: {total} of {max} {cur}", label()),
                        ));
                    }
                }
            }
        }
        Self::apply(&mut map, &spend, 1);
        BudgetCheck::Reserved { reservation: Reservation { spend: Some(spend) }, threshold }
    }

    /// Gives a reservation back: the request was not forwarded.
    pub fn release(&self, mut r: Reservation) {
        if let Some(spend) = r.spend.take() {
            let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            Self::apply(&mut map, &spend, -1);
        }
    }

    /// Tokens counted so far in the window containing `at` for one scope value.
    pub fn used_tokens(&self, agent: &str, window: Window, scope: Scope, value: &str, at: i64) -> u64 {
        let map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        map.get(agent)
            .and_then(|a| a.windows.get(&(window, window_start(at, window), scope)))
            .and_then(|values| values.get(value))
            .map_or(0, |c| c.tokens)
    }

    /// Actions counted so far in the window containing `at` for one scope value.
    pub fn used(&self, agent: &str, window: Window, scope: Scope, value: &str, at: i64) -> u64 {
        let map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        map.get(agent)
            .and_then(|a| a.windows.get(&(window, window_start(at, window), scope)))
            .and_then(|values| values.get(value))
            .map_or(0, |c| c.count)
    }
}

impl Reservation {
    /// The request was forwarded: the slot stays spent.
    pub fn commit(mut self) {
        self.spend = None;
    }
}

/// A refusal by a rate limit, with what the 429 response needs.
#[derive(Debug, Clone)]
pub struct RateLimited {
    pub reason: Reason,
    pub retry_after: Duration,
    /// `RateLimit-Policy` value.
    pub policy: String,
    /// `RateLimit` value.
    pub limit: String,
}

/// Shards of the rate-limit state, chosen by agent: every limit a request is checked against
/// belongs to its agent, so one shard lock makes "check all, then take all" atomic.
const RATE_SHARDS: usize = 16;

/// The GCRA buckets of one rate limit of one agent's manifest.
#[derive(Debug)]
struct LimitBuckets {
    /// What the buckets were made for: a limit changed by a reload starts afresh.
    raw: String,
    burst: u32,
    scope: Scope,
    /// Emission interval: one request per `t` nanoseconds.
    t: u64,
    /// Tolerance: `t * (burst - 1)`, so `burst` requests may arrive at once.
    tau: u64,
    /// Scope value (the agent id, a connector name or an action) → theoretical arrival time of
    /// the next request, in nanoseconds since [`RateLimiters::base`]. A key whose time is not
    /// after now is the same as an absent one.
    tats: HashMap<String, u64>,
}

impl LimitBuckets {
    fn new(rl: &RateLimit) -> LimitBuckets {
        let per = u64::try_from(rl.per.as_nanos()).unwrap_or(u64::MAX);
        let t = (per / u64::from(rl.count.max(1))).max(1);
        let tau = t.saturating_mul(u64::from(rl.burst.max(1) - 1));
        LimitBuckets { raw: rl.raw.clone(), burst: rl.burst, scope: rl.scope, t, tau, tats: HashMap::new() }
    }

    fn made_for(&self, rl: &RateLimit) -> bool {
        self.raw == rl.raw && self.burst == rl.burst && self.scope == rl.scope
    }
}

fn scope_value<'a>(scope: Scope, agent: &'a str, connector: &'a str, action: &'a str) -> &'a str {
    match scope {
        Scope::Agent => agent,
        Scope::Connector => connector,
        Scope::Action => action,
    }
}

type Shard = Mutex<HashMap<String, Vec<LimitBuckets>>>;

/// Rate limits (SPEC §8 step 9) as GCRA buckets, one per (agent, rate limit of its manifest,
/// scope value). A request is checked against every limit that applies and takes from all of
/// them only if all admit it, under one lock, so a request refused by one limit spends no
/// quota of another, and two concurrent requests never both pass a limit with one unit left.
/// (governor's limiters take as they check, with no way to check first: hence this small
/// implementation of the same algorithm.)
pub struct RateLimiters {
    base: Instant,
    shards: Box<[Shard]>,
}

impl Default for RateLimiters {
    fn default() -> Self {
        RateLimiters { base: Instant::now(), shards: (0..RATE_SHARDS).map(|_| Shard::default()).collect() }
    }
}

/// Quota taken by a request that has not been forwarded yet. Dropped without
/// [`RateTaken::commit`] (the request was refused after its rate limits passed: SSRF guard,
/// audit failure), it is given back, as if the request had never been checked.
#[must_use]
pub struct RateTaken<'a> {
    taken: Option<(&'a RateLimiters, &'a Manifest, &'a str, &'a str)>,
}

impl std::fmt::Debug for RateTaken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.taken.is_some() { "RateTaken(held)" } else { "RateTaken(settled)" })
    }
}

impl RateTaken<'_> {
    /// The request was forwarded: the quota stays spent.
    pub fn commit(mut self) {
        self.taken = None;
    }
}

impl Drop for RateTaken<'_> {
    fn drop(&mut self) {
        if let Some((limiters, manifest, connector, action)) = self.taken.take() {
            limiters.give_back(manifest, connector, action);
        }
    }
}

impl RateLimiters {
    pub fn new() -> Self {
        Self::default()
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn shard(&self, agent: &str) -> std::sync::MutexGuard<'_, HashMap<String, Vec<LimitBuckets>>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(agent);
        self.shards[(h as usize) % self.shards.len()].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks every rate limit of `manifest` for this request and, only if all admit it, takes
    /// one unit from each. On refusal nothing is taken, and the answer names the limit that
    /// frees up last (its `Retry-After` is when the request could pass).
    pub fn check<'a>(
        &'a self,
        manifest: &'a Manifest,
        connector: &'a str,
        action: &'a str,
    ) -> Result<RateTaken<'a>, RateLimited> {
        self.check_at(manifest, connector, action, self.now())
    }

    fn check_at<'a>(
        &'a self,
        manifest: &'a Manifest,
        connector: &'a str,
        action: &'a str,
        now: u64,
    ) -> Result<RateTaken<'a>, RateLimited> {
        let limits = &manifest.policy.rate_limits;
        if limits.is_empty() {
            return Ok(RateTaken { taken: None });
        }
        let agent = manifest.agent.id.as_str();
        let mut shard = self.shard(agent);
        if !shard.contains_key(agent) {
            shard.insert(agent.to_string(), Vec::new());
        }
        let Some(buckets) = shard.get_mut(agent) else {
            return Err(refusal(&limits[0], 1));
        };
        // Follow reloads: a limit that changed (or moved) starts with fresh buckets.
        buckets.truncate(limits.len());
        for (i, rl) in limits.iter().enumerate() {
            match buckets.get_mut(i) {
                Some(b) if b.made_for(rl) => {}
                Some(b) => *b = LimitBuckets::new(rl),
                None => buckets.push(LimitBuckets::new(rl)),
            }
        }
        // Check all...
        let mut refused: Option<(usize, u64)> = None;
        for (i, (rl, b)) in limits.iter().zip(buckets.iter()).enumerate() {
            let tat = b.tats.get(scope_value(rl.scope, agent, connector, action)).map_or(now, |&t| t.max(now));
            let earliest = tat.saturating_sub(b.tau);
            if now < earliest && refused.is_none_or(|(_, wait)| earliest - now > wait) {
                refused = Some((i, earliest - now));
            }
        }
        if let Some((i, wait)) = refused {
            return Err(refusal(&limits[i], wait));
        }
        // ...then take from all.
        for (rl, b) in limits.iter().zip(buckets.iter_mut()) {
            let key = scope_value(rl.scope, agent, connector, action);
            match b.tats.get_mut(key) {
                Some(tat) => *tat = (*tat).max(now).saturating_add(b.t),
                None => {
                    b.tats.insert(key.to_string(), now.saturating_add(b.t));
                }
            }
        }
        Ok(RateTaken { taken: Some((self, manifest, connector, action)) })
    }

    /// Gives back one unit of every limit `check` took it from (limits changed by a reload in
    /// between start afresh anyway and are left alone).
    fn give_back(&self, manifest: &Manifest, connector: &str, action: &str) {
        let agent = manifest.agent.id.as_str();
        let mut shard = self.shard(agent);
        let Some(buckets) = shard.get_mut(agent) else { return };
        for (rl, b) in manifest.policy.rate_limits.iter().zip(buckets.iter_mut()) {
            if !b.made_for(rl) {
                continue;
            }
            let t = b.t;
            if let Some(tat) = b.tats.get_mut(scope_value(rl.scope, agent, connector, action)) {
                *tat = tat.saturating_sub(t);
            }
        }
    }

    /// Forgets keys whose bucket is full again (the same as absent) so memory stays bounded;
    /// returns how many keys remain.
    pub fn sweep(&self) -> usize {
        let now = self.now();
        let mut keys = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, buckets| {
                for b in buckets.iter_mut() {
                    b.tats.retain(|_, tat| *tat > now);
                    b.tats.shrink_to_fit();
                    keys += b.tats.len();
                }
                buckets.iter().any(|b| !b.tats.is_empty())
            });
        }
        keys
    }
}

/// The 429 answer for a refusal by `rl` that frees up in `wait_ns`.
fn refusal(rl: &RateLimit, wait_ns: u64) -> RateLimited {
    let wait = Duration::from_nanos(wait_ns);
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let window = rl.per.as_secs().max(1);
    let name = rl.scope.as_str();
    RateLimited {
        reason: Reason::new(
            "rate_limited",
            format!("rate limit {} (burst {}) per {name} reached; retry in {secs}s", rl.raw, rl.burst),
        ),
        retry_after: Duration::from_secs(secs),
        policy: format!("\"{name}\";q={};w={window}", rl.count),
        limit: format!("\"{name}\";r=0;t={secs}"),
    }
}

#[cfg(test)]
mod tests;
