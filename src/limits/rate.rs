//! Rate limits (SPEC §8 step 9, §14.7, §15.3): one GCRA state per (agent, rate limit of its
//! manifest, scope value). A request is checked against every limit that applies and takes from
//! all of them only if all admit it, so a request refused by one limit spends no quota of
//! another, and two concurrent requests never both pass a limit with one unit left.
//!
//! [`RateLimiters`] is what the data path calls, whatever the backend: [`LocalLimiters`] (per
//! gateway, the governor crate) or [`RedisLimiters`] (one state for the fleet).

use super::rate_redis::{RedisGiveBack, RedisLimiters};
use crate::config::{Manifest, RateLimit, Scope};
use crate::policy::{Code, Reason};
use governor::clock::{Clock, MonotonicClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{NotUntil, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A refusal by a rate limit, with what the 429 response needs.
#[derive(Debug, Clone)]
pub(crate) struct RateLimited {
    pub reason: Reason,
    pub retry_after: Duration,
    /// `RateLimit-Policy` value.
    pub policy: String,
    /// `RateLimit` value.
    pub limit: String,
}

/// Why a request does not pass its rate limits.
#[derive(Debug, Clone)]
pub(crate) enum RateRefused {
    /// A limit is spent: 429 `rate_limited` with `Retry-After`.
    Limited(RateLimited),
    /// The rate-limit state cannot be reached in time (Redis down or slow): 503
    /// `rate_limit_unavailable`. Nothing was taken; nothing may be forwarded (SPEC §15.4).
    Unavailable(Reason),
}

/// The GCRA parameters of a limit, from governor's [`Quota`]: the emission interval `t` (one
/// request per `t`) and the burst (`tau = t * (burst - 1)` lets `burst` requests arrive at once).
pub(crate) fn quota_of(rl: &RateLimit) -> Quota {
    let per = u64::try_from(rl.per.as_nanos()).unwrap_or(u64::MAX);
    let t = (per / u64::from(rl.count.max(1))).max(1);
    let burst = NonZeroU32::new(rl.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(Duration::from_nanos(t)).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX)).allow_burst(burst)
}

pub(crate) fn scope_value<'a>(scope: Scope, agent: &'a str, connector: &'a str, action: &'a str) -> &'a str {
    match scope {
        Scope::Agent => agent,
        Scope::Connector => connector,
        Scope::Action => action,
    }
}

/// The 429 answer for a refusal by `rl` that frees up in `wait`.
pub(crate) fn refusal(rl: &RateLimit, wait: Duration) -> RateLimited {
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let window = rl.per.as_secs().max(1);
    let name = rl.scope.as_str();
    RateLimited {
        reason: Reason::new(
            Code::RateLimited,
            format!("rate limit {} (burst {}) per {name} reached; retry in {secs}s", rl.raw, rl.burst),
        ),
        retry_after: Duration::from_secs(secs),
        policy: format!("\"{name}\";q={};w={window}", rl.count),
        limit: format!("\"{name}\";r=0;t={secs}"),
    }
}

// ---------------------------------------------------------------- the facade

enum Backend {
    Local(LocalLimiters),
    Redis(RedisLimiters),
}

/// The rate limiters of the gateway, on the configured backend (`rate_limits.backend`).
pub(crate) struct RateLimiters {
    backend: Backend,
}

impl Default for RateLimiters {
    fn default() -> Self {
        RateLimiters { backend: Backend::Local(LocalLimiters::new()) }
    }
}

impl RateLimiters {
    /// Per-gateway limiters (`rate_limits.backend: local`).
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Fleet-wide limiters in Redis (`rate_limits.backend: redis`).
    pub(crate) fn redis(r: RedisLimiters) -> Self {
        RateLimiters { backend: Backend::Redis(r) }
    }

    /// Checks every rate limit of `manifest` for this request and, only if all admit it, takes
    /// one unit from each. On refusal nothing is taken, and the answer names the limit that
    /// frees up last (its `Retry-After` is when the request could pass). A manifest without
    /// rate limits never waits for the backend.
    pub(crate) async fn check<'a>(
        &'a self,
        manifest: &'a Manifest,
        connector: &'a str,
        action: &'a str,
    ) -> Result<RateTaken<'a>, RateRefused> {
        if manifest.policy.rate_limits.is_empty() {
            return Ok(RateTaken { held: Held::Nothing });
        }
        match &self.backend {
            Backend::Local(l) => l.check(manifest, connector, action).map_err(RateRefused::Limited),
            Backend::Redis(r) => r.check(manifest, connector, action).await,
        }
    }

    /// Whether the backend answers (always for `local`): `/readyz`'s `rate_limits`.
    pub(crate) fn available(&self) -> bool {
        match &self.backend {
            Backend::Local(_) => true,
            Backend::Redis(r) => r.available(),
        }
    }

    /// Forgets local state that is the same as absent; returns how many keys this gateway holds
    /// (Redis expires its keys itself: 0).
    pub(crate) fn sweep(&self) -> usize {
        match &self.backend {
            Backend::Local(l) => l.sweep(),
            Backend::Redis(_) => 0,
        }
    }
}

/// Quota taken by a request that has not been forwarded yet, settled explicitly: kept by
/// [`RateTaken::commit`] once the request is forwarded, given back by [`RateTaken::release`] when
/// it is refused after its rate limits passed (SSRF guard, audit failure), as if it had never
/// been checked. Dropped unsettled (the request's task was cancelled), it is given back as well:
/// at once locally, in a background task for Redis.
#[must_use]
pub(crate) struct RateTaken<'a> {
    held: Held<'a>,
}

enum Held<'a> {
    Nothing,
    Local(&'a LocalLimiters, &'a Manifest, &'a str, &'a str),
    Redis(RedisGiveBack),
}

impl<'a> RateTaken<'a> {
    pub(crate) fn redis(g: RedisGiveBack) -> RateTaken<'a> {
        RateTaken { held: Held::Redis(g) }
    }
}

impl std::fmt::Debug for RateTaken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if matches!(self.held, Held::Nothing) { "RateTaken(settled)" } else { "RateTaken(held)" })
    }
}

impl RateTaken<'_> {
    /// The request was forwarded: the quota stays spent.
    pub(crate) fn commit(mut self) {
        self.held = Held::Nothing;
    }

    /// The request stops before it is forwarded: the quota goes back now (for Redis, awaited
    /// within `rate_limits.redis.timeout`; a Redis that does not answer keeps it until the
    /// key expires).
    pub(crate) async fn release(mut self) {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Nothing => {}
            Held::Local(limiters, manifest, connector, action) => limiters.give_back(manifest, connector, action),
            Held::Redis(g) => g.give_back_now().await,
        }
    }
}

impl Drop for RateTaken<'_> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Nothing => {}
            Held::Local(limiters, manifest, connector, action) => limiters.give_back(manifest, connector, action),
            Held::Redis(g) => g.give_back(),
        }
    }
}

// ---------------------------------------------------------------- local: governor

/// governor's clock for one check: the instant of the request, pinned under the shard lock, in
/// nanoseconds since the limiters were made (read from governor's [`MonotonicClock`]).
#[derive(Default)]
struct Pinned(AtomicU64);

impl Clock for Pinned {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::new(self.0.load(Ordering::Relaxed))
    }
}

/// governor's state store for one limit: the theoretical arrival time (TAT) per scope value.
/// governor's GCRA measures a key and says what the TAT would become; the store only stages it,
/// so every limit of a request can be checked before any is written ([`LocalLimiters`] writes
/// the staged TATs once all limits admitted the request). A key whose TAT is not after now is
/// the same as an absent one. (Only ever used under the shard lock: its own locks are never
/// contended.)
#[derive(Default)]
struct Tats {
    map: Mutex<HashMap<String, Nanos>>,
    staged: Mutex<Option<Nanos>>,
}

impl Tats {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Nanos>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_staged(&self) -> Option<Nanos> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The [`StateStore`] governor's limiter owns: a handle on the limit's [`Tats`].
struct Store(Arc<Tats>);

impl StateStore for Store {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let old = self.0.map().get(key).copied();
        let (out, next) = f(old)?;
        *self.0.staged.lock().unwrap_or_else(|e| e.into_inner()) = Some(next);
        Ok(out)
    }
}

type Governed = RateLimiter<String, Store, Pinned, NoOpMiddleware<Nanos>>;

/// One rate limit of one agent's manifest: governor's limiter over its TATs.
struct LimitState {
    /// What the state was made for: a limit changed by a reload starts afresh.
    raw: String,
    burst: u32,
    scope: Scope,
    /// Emission interval in nanoseconds (governor's replenish interval).
    t: u64,
    tats: Arc<Tats>,
    limiter: Governed,
}

impl LimitState {
    fn new(rl: &RateLimit) -> LimitState {
        let quota = quota_of(rl);
        let t = u64::try_from(quota.replenish_interval().as_nanos()).unwrap_or(u64::MAX).max(1);
        let tats = Arc::new(Tats::default());
        LimitState {
            raw: rl.raw.clone(),
            burst: rl.burst,
            scope: rl.scope,
            t,
            limiter: RateLimiter::new(quota, Store(tats.clone()), Pinned::default()),
            tats,
        }
    }

    fn made_for(&self, rl: &RateLimit) -> bool {
        self.raw == rl.raw && self.burst == rl.burst && self.scope == rl.scope
    }
}

/// Shards of the rate-limit state, chosen by agent: every limit a request is checked against
/// belongs to its agent, so one shard lock makes "check all, then take all" atomic.
const RATE_SHARDS: usize = 16;

type Shard = Mutex<HashMap<String, Vec<LimitState>>>;

/// Per-gateway rate limits (`rate_limits.backend: local`) on the governor crate: its [`Quota`]
/// gives each limit's emission interval and burst, its GCRA decides through a state store that
/// stages what it would write, and a refusal's wait is governor's
/// [`NotUntil::wait_time_from`]. All limits of a request are checked, then all taken, under one
/// lock.
pub(crate) struct LocalLimiters {
    base: Instant,
    shards: Box<[Shard]>,
}

impl Default for LocalLimiters {
    fn default() -> Self {
        LocalLimiters { base: MonotonicClock.now(), shards: (0..RATE_SHARDS).map(|_| Shard::default()).collect() }
    }
}

impl LocalLimiters {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn now(&self) -> u64 {
        Reference::duration_since(&MonotonicClock.now(), self.base).as_u64()
    }

    fn shard(&self, agent: &str) -> std::sync::MutexGuard<'_, HashMap<String, Vec<LimitState>>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(agent);
        self.shards[(h as usize) % self.shards.len()].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`RateLimiters::check`].
    pub(crate) fn check<'a>(
        &'a self,
        manifest: &'a Manifest,
        connector: &'a str,
        action: &'a str,
    ) -> Result<RateTaken<'a>, RateLimited> {
        self.check_at(manifest, connector, action, self.now())
    }

    pub(crate) fn check_at<'a>(
        &'a self,
        manifest: &'a Manifest,
        connector: &'a str,
        action: &'a str,
        now: u64,
    ) -> Result<RateTaken<'a>, RateLimited> {
        let limits = &manifest.policy.rate_limits;
        if limits.is_empty() {
            return Ok(RateTaken { held: Held::Nothing });
        }
        let agent = manifest.agent.id.as_str();
        let mut shard = self.shard(agent);
        let states = shard.entry(agent.to_string()).or_default();
        // Follow reloads: a limit that changed (or moved) starts with fresh state.
        states.truncate(limits.len());
        for (i, rl) in limits.iter().enumerate() {
            match states.get_mut(i) {
                Some(s) if s.made_for(rl) => {}
                Some(s) => *s = LimitState::new(rl),
                None => states.push(LimitState::new(rl)),
            }
        }
        // Check all (governor's GCRA; the store only stages the new TATs)...
        let mut staged: Vec<(String, Nanos)> = Vec::with_capacity(limits.len());
        let mut refused: Option<(usize, Duration)> = None;
        for (i, (rl, s)) in limits.iter().zip(states.iter()).enumerate() {
            s.limiter.clock().0.store(now, Ordering::Relaxed);
            let key = scope_value(rl.scope, agent, connector, action).to_string();
            let answer: Result<(), NotUntil<Nanos>> = s.limiter.check_key(&key);
            match answer {
                Ok(()) => {
                    let next = s.tats.take_staged().unwrap_or(Nanos::new(now.saturating_add(s.t)));
                    staged.push((key, next));
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(Nanos::new(now));
                    if refused.is_none_or(|(_, w)| wait > w) {
                        refused = Some((i, wait));
                    }
                }
            }
        }
        if let Some((i, wait)) = refused {
            return Err(refusal(&limits[i], wait));
        }
        // ...then take from all.
        for (s, (key, next)) in states.iter().zip(staged) {
            s.tats.map().insert(key, next);
        }
        Ok(RateTaken { held: Held::Local(self, manifest, connector, action) })
    }

    /// Gives back one unit of every limit `check` took it from (limits changed by a reload in
    /// between start afresh anyway and are left alone).
    fn give_back(&self, manifest: &Manifest, connector: &str, action: &str) {
        let agent = manifest.agent.id.as_str();
        let mut shard = self.shard(agent);
        let Some(states) = shard.get_mut(agent) else { return };
        for (rl, s) in manifest.policy.rate_limits.iter().zip(states.iter_mut()) {
            if !s.made_for(rl) {
                continue;
            }
            let t = s.t;
            if let Some(tat) = s.tats.map().get_mut(scope_value(rl.scope, agent, connector, action)) {
                *tat = Nanos::new(tat.as_u64().saturating_sub(t));
            }
        }
    }

    /// Forgets keys whose bucket is full again (the same as absent) so memory stays bounded;
    /// returns how many keys remain.
    pub(crate) fn sweep(&self) -> usize {
        let now = self.now();
        let mut keys = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, states| {
                for s in states.iter_mut() {
                    let mut tats = s.tats.map();
                    tats.retain(|_, tat| tat.as_u64() > now);
                    tats.shrink_to_fit();
                    keys += tats.len();
                }
                states.iter().any(|s| !s.tats.map().is_empty())
            });
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Manifest;
    use crate::limits::test_support::manifest;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn rate_limits_refuse_above_the_burst_and_say_when_to_retry() {
        let m = manifest("  rate_limits:\n    - rate: 10/s\n      burst: 5\n");
        let rl = LocalLimiters::new();
        let ok = (0..20).filter(|_| rl.check(&m, "pay", "a").map(RateTaken::commit).is_ok()).count();
        assert!((5..=6).contains(&ok), "{ok}");
        let e = rl.check(&m, "pay", "a").expect_err("refused");
        assert_eq!(e.reason.code, "rate_limited");
        assert_eq!(e.retry_after, Duration::from_secs(1));
        assert_eq!(e.policy, "\"agent\";q=10;w=1");
        assert_eq!(e.limit, "\"agent\";r=0;t=1");
        assert!(rl.sweep() >= 1);
    }

    const TWO_LIMITS: &str = "  rate_limits:\n    - scope: agent\n      rate: 100/h\n      burst: 5\n    - scope: action\n      rate: 1/h\n      burst: 1\n";

    /// Outcomes at one fixed instant, each taken request committed: (passed, refused).
    fn run(rl: &LocalLimiters, m: &Manifest, action: &str, n: usize, now: u64) -> (usize, usize) {
        let mut out = (0, 0);
        for _ in 0..n {
            match rl.check_at(m, "pay", action, now) {
                Ok(t) => {
                    t.commit();
                    out.0 += 1;
                }
                Err(e) => {
                    assert_eq!(e.reason.code, "rate_limited");
                    out.1 += 1;
                }
            }
        }
        out
    }

    /// The local limiter decides as governor's own keyed limiter does for one limit: same quota,
    /// same answers at the same instants, same wait.
    #[test]
    fn one_limit_decides_like_governors_stock_keyed_limiter() {
        use governor::clock::FakeRelativeClock;
        use governor::state::keyed::DefaultKeyedStateStore;
        let m = manifest("  rate_limits:\n    - scope: action\n      rate: 10/s\n      burst: 3\n");
        let quota = quota_of(&m.policy.rate_limits[0]);
        assert_eq!(quota.replenish_interval(), Duration::from_millis(100));
        assert_eq!(quota.burst_size().get(), 3);
        let clock = FakeRelativeClock::default();
        let stock = governor::RateLimiter::<_, _, _, governor::middleware::NoOpMiddleware<governor::nanos::Nanos>>::new(
            quota,
            DefaultKeyedStateStore::<String>::default(),
            clock.clone(),
        );
        let rl = LocalLimiters::new();
        let mut now = 0u64;
        let (mut passed, mut refused) = (0, 0);
        for i in 0..200u64 {
            // Irregular arrivals: bursts and pauses.
            let step = [0, 0, 7, 0, 37, 130, 0, 61][(i % 8) as usize] * 1_000_000;
            now += step;
            clock.advance(Duration::from_nanos(step));
            let want = stock.check_key(&"payment.refund".to_string());
            let got = rl.check_at(&m, "pay", "payment.refund", now);
            match (want, got) {
                (Ok(()), Ok(t)) => {
                    t.commit();
                    passed += 1;
                }
                (Err(nu), Err(e)) => {
                    let wait = nu.wait_time_from(governor::clock::Clock::now(&clock));
                    assert_eq!(
                        e.retry_after,
                        Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                            .max(Duration::from_secs(1))
                    );
                    refused += 1;
                }
                (w, g) => panic!("request {i} at {now}ns: governor {:?}, local {:?}", w.is_ok(), g.is_ok()),
            }
        }
        assert!(passed > 20 && refused > 20, "{passed} passed, {refused} refused");
    }

    #[test]
    fn a_request_refused_by_one_limit_takes_nothing_from_another() {
        // A: per agent, generous (burst 5). B: per action, tight (1 per hour).
        let m = manifest(TWO_LIMITS);
        let rl = LocalLimiters::new();
        let t0 = 1_000_000_000;
        assert_eq!(run(&rl, &m, "payment.refund", 1, t0), (1, 0));
        // B refuses these; before, each of them also spent a unit of A.
        let (_, refused) = run(&rl, &m, "payment.refund", 10, t0);
        assert_eq!(refused, 10);
        let e = rl.check_at(&m, "pay", "payment.refund", t0).expect_err("refused by B");
        assert_eq!(e.policy, "\"action\";q=1;w=3600");
        assert_eq!(e.retry_after, Duration::from_secs(3600));
        // A still has exactly the 4 units the one forwarded request left: one per other action.
        let passed: usize = (0..10).map(|i| run(&rl, &m, &format!("other.{i}"), 1, t0).0).sum();
        assert_eq!(passed, 4);
        let e = rl.check_at(&m, "pay", "other.x", t0).expect_err("A is spent");
        assert_eq!(e.policy, "\"agent\";q=100;w=3600");
    }

    #[test]
    fn the_refusal_names_the_limit_that_frees_up_last() {
        let m = manifest(
            "  rate_limits:\n    - rate: 1/s\n      burst: 1\n    - scope: connector\n      rate: 2/h\n      burst: 1\n",
        );
        let rl = LocalLimiters::new();
        assert_eq!(run(&rl, &m, "a", 1, 0), (1, 0));
        let e = rl.check_at(&m, "pay", "a", 1).expect_err("both refuse");
        // Retrying after the agent limit's second would still meet the connector limit.
        assert_eq!(e.policy, "\"connector\";q=2;w=3600");
        assert_eq!(e.retry_after, Duration::from_secs(1800));
        // Once the agent limit has refilled, only the connector limit refuses, with the rest of its wait.
        let e = rl.check_at(&m, "pay", "a", 1_000_000_000).expect_err("connector refuses");
        assert_eq!(e.retry_after, Duration::from_secs(1799));
        assert_eq!(run(&rl, &m, "a", 1, 1_800_000_000_000), (1, 0));
    }

    #[test]
    fn concurrent_requests_against_one_remaining_unit_pass_exactly_once() {
        let m =
            Arc::new(manifest(TWO_LIMITS.replace("rate: 1/h\n      burst: 1", "rate: 1/h\n      burst: 3").as_str()));
        for round in 0..20 {
            let rl = Arc::new(LocalLimiters::new());
            // Two of the action limit's three units spent: one remains.
            assert_eq!(run(&rl, &m, "payment.refund", 2, 0), (2, 0));
            let start = Arc::new(std::sync::Barrier::new(16));
            let threads: Vec<_> = (0..16)
                .map(|_| {
                    let (m, rl, start) = (m.clone(), rl.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        rl.check(&m, "pay", "payment.refund").map(RateTaken::commit).is_ok()
                    })
                })
                .collect();
            let passed = threads.into_iter().map(|t| t.join().unwrap()).filter(|&p| p).count();
            assert_eq!(passed, 1, "round {round}");
            // The agent limit gave exactly three units, not one per attempt.
            assert_eq!(run(&rl, &m, "other", 5, 0), (2, 3), "round {round}");
        }
    }

    #[test]
    fn quota_of_a_request_refused_later_is_given_back() {
        let m = manifest(TWO_LIMITS);
        let rl = LocalLimiters::new();
        // Taken, then dropped uncommitted (the SSRF guard or the audit log refused it): given back.
        for _ in 0..2 {
            let taken = rl.check_at(&m, "pay", "payment.refund", 0).expect("admitted");
            drop(taken);
        }
        // Released explicitly (the data path's way), the same.
        let taken = rl.check_at(&m, "pay", "payment.refund", 0).expect("admitted");
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(taken.release());
        assert_eq!(run(&rl, &m, "payment.refund", 3, 0), (1, 2));
        // Only the committed one spent a unit of the agent limit: 4 of 5 remain.
        let passed: usize = (0..10).map(|i| run(&rl, &m, &format!("other.{i}"), 1, 0).0).sum();
        assert_eq!(passed, 4);
    }

    #[test]
    fn a_limit_changed_by_a_reload_starts_afresh_and_sweeping_forgets_full_buckets() {
        let rl = LocalLimiters::new();
        let one = manifest("  rate_limits:\n    - rate: 1/h\n      burst: 1\n");
        assert_eq!(run(&rl, &one, "a", 2, 0), (1, 1));
        let two = manifest("  rate_limits:\n    - rate: 2/h\n      burst: 1\n");
        assert_eq!(run(&rl, &two, "a", 2, 0), (1, 1));
        let by_action = manifest("  rate_limits:\n    - scope: action\n      rate: 2/h\n      burst: 1\n");
        assert_eq!(run(&rl, &by_action, "a", 2, 0), (1, 1));
        // A bucket that refilled long ago (its time is before now) is dropped; a spent one stays.
        assert_eq!(rl.sweep(), 1);
        let fast = manifest("  rate_limits:\n    - rate: 1000/s\n      burst: 1\n");
        let rl = LocalLimiters::new();
        rl.check(&fast, "pay", "a").map(RateTaken::commit).expect("admitted");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(rl.sweep(), 0);
    }
}
