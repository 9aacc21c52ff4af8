//! Budgets (SPEC §8 step 8) and rate limits (step 9).
//!
//! Budget counters live in memory behind one lock, so a reservation is a single atomic
//! check-and-increment: N concurrent requests against 1 remaining slot forward exactly one.
//! They survive restarts because they are rebuilt from the audit log, which holds every
//! committed ALLOW decision durably before it is forwarded: the log is the only source of truth.
//! Every counted decision increments the counters of all window/scope combinations, so a budget
//! added by a reload sees the whole current window.

use crate::config::{Manifest, Scope, Window};
use crate::policy::Reason;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WINDOWS: [Window; 2] = [Window::Day, Window::Hour];
const SCOPES: [Scope; 3] = [Scope::Agent, Scope::Connector, Scope::Action];

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CounterKey {
    agent: String,
    window: Window,
    start: i64,
    scope: Scope,
    value: String,
}

#[derive(Debug, Default, Clone)]
struct Counter {
    count: u64,
    spend: BTreeMap<String, Decimal>,
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
    fn keys(&self) -> impl Iterator<Item = CounterKey> + '_ {
        WINDOWS.iter().flat_map(move |&w| {
            SCOPES.iter().map(move |&s| CounterKey {
                agent: self.agent.clone(),
                window: w,
                start: self.at.div_euclid(w.seconds()) * w.seconds(),
                scope: s,
                value: self.scope_value(s).to_string(),
            })
        })
    }
    fn scope_value(&self, s: Scope) -> &str {
        match s {
            Scope::Agent => &self.agent,
            Scope::Connector => &self.connector,
            Scope::Action => &self.action,
        }
    }
}

/// Budget counters for every agent.
#[derive(Debug, Default)]
pub struct Budgets {
    counters: Mutex<HashMap<CounterKey, Counter>>,
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

    fn apply(map: &mut HashMap<CounterKey, Counter>, spend: &Spend, sign: i8) {
        for key in spend.keys() {
            let c = map.entry(key).or_default();
            if sign > 0 {
                c.count += 1;
            } else {
                c.count = c.count.saturating_sub(1);
            }
            if let Some((amt, cur)) = &spend.amount {
                let s = c.spend.entry(cur.clone()).or_default();
                *s = if sign > 0 { *s + amt } else { *s - amt };
            }
        }
    }

    /// Counts an action that was already allowed (used when rebuilding from the log).
    pub fn record(&self, spend: &Spend) {
        let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        Self::apply(&mut map, spend, 1);
    }

    /// Atomically checks every budget of `manifest` against `spend` and, if none is spent,
    /// counts it.
    pub fn reserve(&self, manifest: &Manifest, spend: Spend) -> BudgetCheck {
        let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 50_000 {
            let now = spend.at;
            map.retain(|k, _| k.start + k.window.seconds() > now);
        }
        let mut threshold = None;
        for b in &manifest.policy.budgets {
            let key = CounterKey {
                agent: spend.agent.clone(),
                window: b.window,
                start: spend.at.div_euclid(b.window.seconds()) * b.window.seconds(),
                scope: b.scope,
                value: spend.scope_value(b.scope).to_string(),
            };
            let used = map.get(&key).cloned().unwrap_or_default();
            let label = format!("{} budget for {} {}", b.window.as_str(), b.scope.as_str(), key.value);
            if let Some(max) = b.max_actions {
                if used.count >= max {
                    return BudgetCheck::Exceeded(Reason::new(
                        "budget_exceeded",
                        format!("{label} is spent: {}/{max} actions", used.count),
                    ));
                }
                if let Some(pct) = b.escalate_at_percent
                    && threshold.is_none()
                    && used.count * 100 >= max * u64::from(pct)
                {
                    threshold = Some(Reason::new(
                        "budget_threshold_reached",
                        format!("{label} reached {pct}%: {}/{max} actions", used.count),
                    ));
                }
            }
            if let Some((amt, cur)) = &spend.amount
                && let Some(max) = b.max_spend.get(cur)
            {
                let spent = used.spend.get(cur).copied().unwrap_or_default();
                if spent + amt > *max {
                    return BudgetCheck::Exceeded(Reason::new(
                        "budget_exceeded",
                        format!("{label} would be exceeded: {spent} + {amt} > {max} {cur}"),
                    ));
                }
                if let Some(pct) = b.escalate_at_percent
                    && threshold.is_none()
                    && (spent + amt) * Decimal::from(100) >= *max * Decimal::from(pct)
                {
                    threshold = Some(Reason::new(
                        "budget_threshold_reached",
                        format!("{label} reached {pct}%: {} of {max} {cur}", spent + amt),
                    ));
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

    /// Actions counted so far in the window containing `at` for one scope value.
    pub fn used(&self, agent: &str, window: Window, scope: Scope, value: &str, at: i64) -> u64 {
        let key = CounterKey {
            agent: agent.into(),
            window,
            start: at.div_euclid(window.seconds()) * window.seconds(),
            scope,
            value: value.into(),
        };
        self.counters.lock().unwrap_or_else(|e| e.into_inner()).get(&key).map_or(0, |c| c.count)
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

/// (agent, index of the rate limit in its manifest, rate, burst): a changed limit gets a new bucket.
type LimiterKey = (String, usize, String, u32);

/// Keyed token-bucket limiters, one per (agent, rate limit of its manifest).
#[derive(Default)]
pub struct RateLimiters {
    limiters: Mutex<HashMap<LimiterKey, Arc<DefaultKeyedRateLimiter<String>>>>,
}

impl RateLimiters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one unit of every rate limit of `manifest` for this request.
    pub fn check(&self, manifest: &Manifest, connector: &str, action: &str) -> Result<(), RateLimited> {
        let agent = &manifest.agent.id;
        for (i, rl) in manifest.policy.rate_limits.iter().enumerate() {
            let limiter = {
                let mut map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
                map.entry((agent.clone(), i, rl.raw.clone(), rl.burst))
                    .or_insert_with(|| {
                        let period = rl.per / rl.count.max(1);
                        let burst = NonZeroU32::new(rl.burst).unwrap_or(NonZeroU32::MIN);
                        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
                            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                            .allow_burst(burst);
                        Arc::new(RateLimiter::keyed(quota))
                    })
                    .clone()
            };
            let key = match rl.scope {
                Scope::Agent => agent.clone(),
                Scope::Connector => format!("{agent}/{connector}"),
                Scope::Action => format!("{agent}/{action}"),
            };
            if let Err(not_until) = limiter.check_key(&key) {
                use governor::clock::{Clock, DefaultClock};
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let window = rl.per.as_secs().max(1);
                let name = rl.scope.as_str();
                return Err(RateLimited {
                    reason: Reason::new(
                        "rate_limited",
                        format!("rate limit {} (burst {}) per {name} reached; retry in {secs}s", rl.raw, rl.burst),
                    ),
                    retry_after: Duration::from_secs(secs.max(1)),
                    policy: format!("\"{name}\";q={};w={window}", rl.count),
                    limit: format!("\"{name}\";r=0;t={}", secs.max(1)),
                });
            }
        }
        Ok(())
    }

    /// Forgets idle keys so memory stays bounded; returns how many keys remain.
    pub fn sweep(&self) -> usize {
        let map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .map(|l| {
                l.retain_recent();
                l.shrink_to_fit();
                l.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests;
