//! Budgets (SPEC §8 step 8) and rate limits (step 9).
//!
//! Budgets live in [`budgets`]: the rules of what counts and when a request is admitted, and a
//! reservation that every path of the data path settles explicitly, by request id.
//!
//! Rate limits are GCRA buckets checked all before any is taken ([`RateLimiters::check`]).
//! How fast one agent's refusals are recorded is bounded by [`refusals`].

pub mod budgets;
pub mod in_flight;
pub mod refusals;

pub use budgets::{
    Ask, BudgetCheck, Budgets, Counted, Reservation, Settlement, Spend, TokenUse, Used, admit, counts_toward_budgets,
    recorded_spend, token_charge, usage_tokens,
};

use crate::config::{Manifest, RateLimit, Scope};
use crate::policy::Reason;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
