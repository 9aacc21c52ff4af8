//! Fleet-wide rate limits in Redis (`rate_limits.backend: redis`, SPEC §15.3, §15.4).
//!
//! One GCRA state per (agent, rate limit, scope value) for every gateway sharing the server,
//! under `uapk:rl:`, with the emission interval and burst of the local limiter (governor's
//! [`Quota`](governor::Quota)) in microseconds and Redis `TIME` as the clock. One Lua script
//! checks every limit of a request and takes from all only if all admit it, so a refused request
//! takes nothing. A key expires once its bucket is full again.
//!
//! Redis unreachable or slower than `rate_limits.redis.timeout` fails closed: the request is
//! refused `rate_limit_unavailable` (503), `/readyz` says `"rate_limits": false`, and a ping
//! every second notices when it is back. The URL's password is never shown.

use super::rate::{RateRefused, RateTaken, quota_of, refusal, scope_value};
use crate::config::{Manifest, RedisSettings, SecretUrl};
use crate::metrics::StateMetrics;
use crate::policy::{Code, Reason};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

/// The `backend` label of the state metrics.
const BACKEND: &str = "redis";

/// Key prefix of every rate-limit state.
pub(crate) const KEY_PREFIX: &str = "uapk:rl:";

/// KEYS: one state per limit. ARGV: per limit, its emission interval `t` and tolerance `tau`
/// (microseconds). Returns `{0, 0}` when every limit admitted the request (each then took one
/// unit), else `{i, wait}`: the 1-based limit that frees up last and its wait in microseconds,
/// nothing taken.
const CHECK_AND_TAKE: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local next_tats = {}
local worst, worst_wait = 0, 0
for i = 1, #KEYS do
  local t = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local earliest = tat - tau
  if now < earliest and earliest - now > worst_wait then
    worst, worst_wait = i, earliest - now
  end
  next_tats[i] = tat + t
end
if worst > 0 then
  return {worst, worst_wait}
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', next_tats[i]))
  redis.call('PEXPIRE', KEYS[i], math.ceil((next_tats[i] - now) / 1000) + 1000)
end
return {0, 0}
";

/// KEYS: the states a request took from; ARGV: each one's `t` (microseconds). Gives one unit
/// back to each (the request was refused after its limits passed).
const GIVE_BACK: &str = r"
for i = 1, #KEYS do
  local tat = redis.call('GET', KEYS[i])
  if tat then
    redis.call('SET', KEYS[i], string.format('%.0f', tonumber(tat) - tonumber(ARGV[i])), 'KEEPTTL')
  end
end
return 0
";

static CHECK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CHECK_AND_TAKE));
static GIVE_BACK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GIVE_BACK));

struct Inner {
    manager: ConnectionManager,
    timeout: Duration,
    url: SecretUrl,
    up: AtomicBool,
    metrics: Arc<StateMetrics>,
}

impl Inner {
    /// Records whether Redis answered; logs each change (never the password).
    fn set_up(&self, up: bool, why: Option<&str>) {
        self.metrics.set_up(BACKEND, up);
        let was = self.up.swap(up, Ordering::SeqCst);
        if was != up {
            if up {
                tracing::info!(url = %self.url, "rate limits: Redis answers again");
            } else {
                tracing::warn!(
                    url = %self.url,
                    error = why.unwrap_or("no answer"),
                    "rate limits: Redis unreachable; requests of agents with rate limits are refused rate_limit_unavailable"
                );
            }
        }
    }

    async fn ping(&self) -> Result<(), String> {
        let mut con = self.manager.clone();
        match tokio::time::timeout(self.timeout, redis::cmd("PING").query_async::<String>(&mut con)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}

/// Rate limits kept in Redis for the fleet.
pub(crate) struct RedisLimiters {
    inner: Arc<Inner>,
}

/// One unit of each limit a request took, given back if it is not forwarded.
pub(crate) struct RedisGiveBack {
    inner: Arc<Inner>,
    keys: Vec<String>,
    ts: Vec<u64>,
}

impl RedisGiveBack {
    /// Gives the units back, bounded by the timeout (best effort: a Redis that does not answer
    /// keeps them until the keys expire).
    pub(crate) async fn give_back_now(self) {
        let mut con = self.inner.manager.clone();
        let mut inv = GIVE_BACK_SCRIPT.prepare_invoke();
        for (k, t) in self.keys.iter().zip(&self.ts) {
            inv.key(k).arg(t);
        }
        let t0 = crate::clock::instant();
        let r = tokio::time::timeout(self.inner.timeout, inv.invoke_async::<i64>(&mut con)).await;
        self.inner.metrics.observe(BACKEND, "rate_limit", crate::clock::since(t0).as_secs_f64());
        if !matches!(r, Ok(Ok(_))) {
            tracing::warn!(url = %self.inner.url, "rate limits: quota of a refused request could not be given back");
        }
    }

    /// [`RedisGiveBack::give_back_now`] from a destructor: in a background task.
    pub(crate) fn give_back(self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(self.give_back_now());
        }
    }
}

/// What is escaped in a key component: all but letters, digits, `-`, `.` and `_` (so `:`, `{`,
/// `}` and `%` are), which keeps keys unambiguous.
const KEY_PART: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_');

fn part(s: &str) -> String {
    utf8_percent_encode(s, KEY_PART).to_string()
}

/// The state's key: `uapk:rl:{agent}:limit index:rate:burst:scope:scope value`. The agent is a
/// hash tag, so all keys of one request live in one Redis Cluster slot; a limit changed by a
/// reload gets a fresh key.
fn key(agent: &str, i: usize, rl: &crate::config::RateLimit, value: &str) -> String {
    format!("{KEY_PREFIX}{{{}}}:{i}:{}:{}:{}:{}", part(agent), part(&rl.raw), rl.burst, rl.scope.as_str(), part(value))
}

/// Microseconds, at least 1 (Redis `TIME` has microsecond resolution).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl RedisLimiters {
    /// Connects lazily (a gateway starts while Redis is down, failing closed until it answers)
    /// and starts the once-a-second ping that keeps `/readyz` and `uapk_state_up` current.
    pub(crate) async fn start(settings: &RedisSettings, metrics: Arc<StateMetrics>) -> Result<RedisLimiters, String> {
        let url = settings.url.clone();
        let client = match &settings.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("rate_limits.redis.ca_file {}: cannot read: {e}", ca.display()))?;
                redis::Client::build_with_tls(
                    url.expose(),
                    redis::TlsCertificates { client_tls: None, root_cert: Some(pem) },
                )
            }
            None => redis::Client::open(url.expose()),
        }
        .map_err(|e| format!("rate_limits.redis {url}: {:?}", e.kind()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("rate_limits.redis {url}: {:?}", e.kind()))?;
        let inner = Arc::new(Inner { manager, timeout: settings.timeout, url, up: AtomicBool::new(false), metrics });
        inner.metrics.set_up(BACKEND, false);
        match inner.ping().await {
            Ok(()) => {
                inner.set_up(true, None);
            }
            Err(e) => inner.set_up(false, Some(&e)),
        }
        tracing::info!(url = %inner.url, timeout = ?inner.timeout, "rate limits kept in Redis for the fleet");
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Ends with the gateway that owns the limiters.
                let Some(inner) = weak.upgrade() else { break };
                let t0 = crate::clock::instant();
                let r = inner.ping().await;
                inner.metrics.observe(BACKEND, "ping", crate::clock::since(t0).as_secs_f64());
                match r {
                    Ok(()) => inner.set_up(true, None),
                    Err(e) => inner.set_up(false, Some(&e)),
                }
            }
        });
        Ok(RedisLimiters { inner })
    }

    /// Whether Redis answered the last ping or request.
    pub(crate) fn available(&self) -> bool {
        self.inner.up.load(Ordering::SeqCst)
    }

    /// Checks and takes every limit of the request in one script; see
    /// [`RateLimiters::check`](super::RateLimiters::check).
    pub(crate) async fn check<'a>(
        &'a self,
        manifest: &'a Manifest,
        connector: &'a str,
        action: &'a str,
    ) -> Result<RateTaken<'a>, RateRefused> {
        let limits = &manifest.policy.rate_limits;
        let agent = manifest.agent.id.as_str();
        let mut keys = Vec::with_capacity(limits.len());
        let mut ts = Vec::with_capacity(limits.len());
        let mut inv = CHECK_SCRIPT.prepare_invoke();
        for (i, rl) in limits.iter().enumerate() {
            let quota = quota_of(rl);
            let t = micros(quota.replenish_interval());
            let tau = t.saturating_mul(u64::from(quota.burst_size().get() - 1));
            let k = key(agent, i, rl, scope_value(rl.scope, agent, connector, action));
            inv.key(&k).arg(t).arg(tau);
            keys.push(k);
            ts.push(t);
        }
        let inner = &self.inner;
        let mut con = inner.manager.clone();
        let t0 = crate::clock::instant();
        let answer = tokio::time::timeout(inner.timeout, inv.invoke_async::<(i64, i64)>(&mut con)).await;
        inner.metrics.observe(BACKEND, "rate_limit", crate::clock::since(t0).as_secs_f64());
        let (refused_by, wait_us) = match answer {
            Ok(Ok(a)) => {
                inner.set_up(true, None);
                a
            }
            Ok(Err(e)) => {
                inner.set_up(false, Some(&e.to_string()));
                return Err(unavailable(inner.timeout));
            }
            Err(_) => {
                inner.set_up(false, Some(&format!("no answer within {:?}", inner.timeout)));
                return Err(unavailable(inner.timeout));
            }
        };
        match usize::try_from(refused_by).ok().and_then(|i| i.checked_sub(1)).and_then(|i| limits.get(i)) {
            None if refused_by == 0 => Ok(RateTaken::redis(RedisGiveBack { inner: inner.clone(), keys, ts })),
            None => Err(unavailable(inner.timeout)),
            Some(rl) => Err(RateRefused::Limited(refusal(rl, Duration::from_micros(wait_us.max(0) as u64)))),
        }
    }
}

fn unavailable(timeout: Duration) -> RateRefused {
    RateRefused::Unavailable(Reason::new(
        Code::RateLimitUnavailable,
        format!("the rate-limit state (Redis) did not answer within {timeout:?}; nothing is forwarded until it does"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous_and_share_the_agent_slot() {
        let rl = crate::config::RateLimit {
            scope: crate::config::Scope::Action,
            raw: "5/m".into(),
            count: 5,
            per: Duration::from_secs(60),
            burst: 5,
        };
        assert_eq!(key("shop-agent", 1, &rl, "payment.refund"), "uapk:rl:{shop-agent}:1:5%2Fm:5:action:payment.refund");
        assert_ne!(key("a", 0, &rl, "x:y"), key("a", 0, &rl, "x%3Ay"));
        assert_eq!(micros(Duration::from_nanos(10)), 1);
        assert_eq!(micros(Duration::from_secs(12)), 12_000_000);
    }

    #[test]
    fn the_url_password_is_never_shown() {
        let u = SecretUrl::new("redis://:s3cret@redis.internal:6379/0".into());
        assert_eq!(u.to_string(), "redis://:***@redis.internal:6379/0");
        assert!(!format!("{u:?}").contains("s3cret"));
        assert!(u.has_password());
        assert!(!SecretUrl::new("redis://redis.internal".into()).has_password());
    }
}
