//! Budgets (SPEC §8 step 8, §14.5, §16.1): the rules of what counts and when a request is
//! admitted, and the counter store that applies them.
//!
//! The rules are pure functions, so every state backend applies the same ones:
//! - what counts: [`counts_toward_budgets`] (an ALLOW of a route's action) and, for an entry read
//!   back from the log, [`recorded_spend`] with [`usage_tokens`] (an `outcome` entry's
//!   `usage_charged`);
//! - what an LLM call is charged: [`token_charge`] (its usage when read, else its estimate);
//! - admission: [`admit`], over what one budget's window holds ([`Used`]); a call that reserves
//!   tokens is admitted only while `counted + reserved < max_tokens`.
//!
//! The store's operations are the ones a database shared by several gateways implements too
//! (its reserve being a conditional `UPDATE … WHERE`): [`Budgets::reserve`] checks and holds
//! atomically, under the request's id; [`Budgets::settle`] ends what is held by that id,
//! idempotently ([`Settlement`]): given back when the request stops before it is forwarded,
//! kept when it is forwarded, and a held token estimate turned into the tokens its outcome
//! records. Nothing is given back from a destructor: every path of the data path settles.
//!
//! This store keeps the counters in memory behind one lock. They survive restarts because
//! they are rebuilt from the audit log ([`Budgets::record`]), which holds every committed ALLOW
//! decision durably before it is forwarded and every outcome's charged tokens. Every counted
//! decision increments the counters of all window/scope combinations (also for agents whose
//! manifest has no budget yet), so a budget added by a reload sees the whole current window.

use crate::config::{Budget, Manifest, Scope, Window};
use crate::policy::{Code, Reason};
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

// ---------------------------------------------------------------- the rules

/// The one rule of what budgets count, applied both when a request is decided and when the
/// counters are rebuilt from the log, so a restart never changes a count: an ALLOW decision of
/// a route's action (SPEC §8 step 8: "only forwarded ALLOWs count"). Not counted: refusals and
/// escalations, also in `dry_run` (forwarded, but not as ALLOWs); and tunnel authorisations
/// (a CONNECT, or a TLS connection caught by the transparent listener), which match no route
/// and are not actions: the requests inside an intercepted tunnel are decided, and counted,
/// one by one like any other, while a `passthrough` tunnel is bounded by its connector's allow
/// lists, not by budgets.
pub(crate) fn counts_toward_budgets(decision: &str, route: Option<&str>) -> bool {
    decision == "allow" && route.is_some()
}

/// The tokens an LLM call is charged (SPEC §16.1): the total of the usage read from its
/// response, else (usage unknown: a stream without usage, a client gone, an unreadable body,
/// an upstream error after sending) its reserved estimate — never 0 for a call that was sent.
pub(crate) fn token_charge(read_total: Option<u64>, estimate: u64) -> u64 {
    read_total.unwrap_or(estimate)
}

/// The tokens an `outcome` entry counts toward token budgets: its `usage_charged` (a decimal
/// string, as every integer in the log). Entries written before `usage_charged` existed count
/// their `usage.total_tokens`; with neither, nothing. Used when the outcome entry is written
/// (runtime) and when it is read back (rebuild), so both count the same.
pub(crate) fn usage_tokens(outcome: &serde_json::Value) -> Option<u64> {
    let int = |v: &serde_json::Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    match outcome.get("usage_charged") {
        Some(c) => int(c),
        None => int(&outcome["usage"]["total_tokens"]),
    }
    .filter(|&n| n > 0)
}

/// What a committed entry adds to the budget counters, if anything: a `decision` entry what it
/// spends (when it counts, see [`counts_toward_budgets`]), an `outcome` entry the tokens it
/// charged ([`usage_tokens`]). `fallback_at` dates an entry whose `ts` cannot be read.
pub(crate) fn recorded_spend(entry: &serde_json::Value, fallback_at: i64) -> Option<Counted> {
    let at = entry["ts"]
        .as_str()
        .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
        .map_or(fallback_at, |t| t.unix_timestamp());
    let s = |k: &str| entry[k].as_str().unwrap_or_default().to_string();
    if entry["kind"] == "outcome" {
        let tokens = usage_tokens(entry)?;
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

/// What one budget's current window holds for the request's scope value, as a backend reads
/// it for [`admit`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Used {
    /// Actions counted.
    pub count: u64,
    /// Amount counted in the request's currency.
    pub spend: Decimal,
    /// LLM tokens counted (charged by settled calls).
    pub tokens: u64,
    /// LLM token estimates held by calls in flight.
    pub reserved: u64,
}

/// Whether `ask` is admitted under every budget of `manifest`, given what each budget's window
/// holds (`used`): `Err` is `budget_exceeded`; `Ok` may carry `budget_threshold_reached`.
///
/// Token budgets: a call that reserves tokens is admitted only while `counted + reserved <
/// max_tokens` — its own estimate is not part of the check, so concurrent calls overshoot by at
/// most one estimate, and the call that crosses the cap completes (SPEC §14.5, §16.1). A
/// request that reserves no tokens (not an LLM call) is refused once `counted` reaches the cap.
pub(crate) fn admit(manifest: &Manifest, ask: &Ask, used: impl Fn(&Budget) -> Used) -> Result<Option<Reason>, Reason> {
    let spend = &ask.spend;
    let mut threshold = None;
    for b in &manifest.policy.budgets {
        let value = spend.scope_value(b.scope);
        let u = used(b);
        let label = || format!("{} budget for {} {}", b.window.as_str(), b.scope.as_str(), value);
        if let Some(max) = b.max_actions {
            let count = u.count;
            if count >= max {
                return Err(Reason::new(Code::BudgetExceeded, format!("{} is spent: {count}/{max} actions", label())));
            }
            if let Some(pct) = b.escalate_at_percent
                && threshold.is_none()
                && u128::from(count) * 100 >= u128::from(max) * u128::from(pct)
            {
                threshold = Some(Reason::new(
                    Code::BudgetThresholdReached,
                    format!("{} reached {pct}%: {count}/{max} actions", label()),
                ));
            }
        }
        if let Some(max) = b.max_tokens {
            let (tokens, held) = (u.tokens, if ask.tokens.is_some() { u.reserved } else { 0 });
            let taken = tokens.saturating_add(held);
            let held_note =
                || if held > 0 { format!(" ({held} more reserved by calls in flight)") } else { String::new() };
            if taken >= max {
                return Err(Reason::new(
                    Code::BudgetExceeded,
                    format!("{} is spent: {tokens}/{max} tokens{}", label(), held_note()),
                ));
            }
            if let Some(pct) = b.escalate_at_percent
                && threshold.is_none()
                && u128::from(taken) * 100 >= u128::from(max) * u128::from(pct)
            {
                threshold = Some(Reason::new(
                    Code::BudgetThresholdReached,
                    format!("{} reached {pct}%: {tokens}/{max} tokens{}", label(), held_note()),
                ));
            }
        }
        if let Some((amt, cur)) = &spend.amount
            && let Some(max) = b.max_spend.get(cur)
        {
            let spent = u.spend;
            // Fail closed: a sum too large for a decimal exceeds any cap.
            let Some(total) = spent.checked_add(*amt).filter(|t| t <= max) else {
                return Err(Reason::new(
                    Code::BudgetExceeded,
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
                        Code::BudgetThresholdReached,
                        format!("{} reached {pct}%: {total} of {max} {cur}", label()),
                    ));
                }
            }
        }
    }
    Ok(threshold)
}

// ---------------------------------------------------------------- the operations' values

/// What one action spends: its identity and optional amount.
#[derive(Debug, Clone)]
pub struct Spend {
    /// Id of the agent that acts.
    pub agent: String,
    /// Name of the connector the action goes through.
    pub connector: String,
    /// The action type (the route's or tool's `action`).
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

/// A reservation request: the request's id (what settles it), its action, and for an LLM call
/// the tokens it is estimated to use (SPEC §16.1).
#[derive(Debug, Clone)]
pub struct Ask {
    /// The request id the reservation is held under and settled by.
    pub id: String,
    /// What the request would spend: its agent, connector, action and amount.
    pub spend: Spend,
    /// For a call to a connector with `usage`, the tokens it is estimated to use and reserves;
    /// `None` for other requests.
    pub tokens: Option<u64>,
}

/// LLM tokens one request was charged: counted once its `outcome` entry (which records them as
/// `usage_charged`) is written.
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
pub(crate) enum Counted {
    /// An allowed action (and its amount).
    Action(Spend),
    /// LLM tokens charged for a response.
    Tokens(TokenUse),
}

/// What a request holds after [`Budgets::reserve`]: settle it by its id with
/// [`Budgets::settle`]. It gives nothing back by itself.
#[must_use = "a reservation is settled explicitly: Budgets::settle"]
#[derive(Debug)]
pub struct Reservation {
    id: String,
    /// Held in a store shared by a fleet: kept in the commit of the request's decision entry
    /// (`audit::Precondition::keep_budget`).
    shared: bool,
}

impl Reservation {
    /// A reservation a fleet's store holds under `id` (`shared`), or one it did not need to
    /// store (the agent has no budget).
    pub(crate) fn new(id: String, shared: bool) -> Reservation {
        Reservation { id, shared }
    }

    /// Whether the decision's commit must keep it (see [`crate::audit::Precondition`]).
    pub(crate) fn shared(&self) -> bool {
        self.shared
    }

    /// The request id the reservation is held under.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The result of a reservation attempt.
#[derive(Debug)]
pub enum BudgetCheck {
    /// Reserved; `threshold` carries `budget_threshold_reached` when an escalation percentage is
    /// reached (the caller escalates unless an override lifts it).
    Reserved {
        /// What the request now holds.
        reservation: Reservation,
        /// `budget_threshold_reached`, when an `escalate_at_percent` share is reached.
        threshold: Option<Reason>,
    },
    /// A budget is spent: `budget_exceeded`.
    Exceeded(Reason),
}

/// How a reservation ends. Settling is idempotent: what is already settled stays as it is.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// The request stopped before it was forwarded (a refusal, an escalation, a rate limit, the
    /// SSRF guard, an audit failure, a client gone): everything it holds goes back. Once it was
    /// forwarded, nothing changes.
    Release,
    /// The request was forwarded: its action (and amount) stays counted if the decision counts
    /// (`counts_toward_budgets`; a dry-run escalation does not), and a token estimate stays
    /// held until its usage settles.
    Forwarded {
        /// Whether the decision counts toward budgets: false for a dry-run escalation.
        counted: bool,
    },
    /// A forwarded LLM call's outcome: the estimate it held is released and the tokens it was
    /// charged (`token_charge`) count — also for a call that held none (a dry run).
    Tokens(TokenUse),
}

// ---------------------------------------------------------------- the in-memory store

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
    /// LLM tokens charged (SPEC §14.5, §16.1).
    tokens: u64,
    /// LLM token estimates of calls in flight.
    reserved: u64,
}

/// What a request holds, by its id.
#[derive(Debug)]
struct Held {
    spend: Spend,
    /// The action (and amount) is counted but not yet kept: given back on release.
    action: bool,
    /// A token estimate held until the call's usage settles.
    tokens: Option<u64>,
    forwarded: bool,
    /// When it was reserved (for [`Budgets::expire_unforwarded`]).
    since: Instant,
}

#[derive(Debug, Default)]
struct State {
    agents: HashMap<String, AgentCounters>,
    held: HashMap<String, Held>,
}

/// Budget counters for every agent, and what requests in flight hold. Cloning shares them.
#[derive(Debug, Default, Clone)]
pub struct Budgets {
    state: Arc<Mutex<State>>,
}

/// Applies `f` to the counter of every window/scope combination of one (agent, connector,
/// action) at `at`, creating counters as needed; a new window forgets the one it replaced.
fn add(map: &mut HashMap<String, AgentCounters>, s: &Spend, at: i64, f: impl Fn(&mut Counter)) {
    if !map.contains_key(s.agent.as_str()) {
        map.insert(s.agent.clone(), AgentCounters::default());
    }
    let Some(counters) = map.get_mut(s.agent.as_str()) else { return };
    for w in WINDOWS {
        let start = window_start(at, w);
        if !counters.windows.contains_key(&(w, start, Scope::Agent)) {
            // A new window of this kind began: the ones it replaced are over.
            counters.windows.retain(|&(kw, kstart, _), _| kw != w || kstart + kw.seconds() > at);
        }
        for scope in SCOPES {
            let value = s.scope_value(scope);
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

/// Applies `f` to the existing counters of `s`'s windows at `s.at`: only what was counted is
/// taken back, and a window forgotten since stays forgotten.
fn take_back(map: &mut HashMap<String, AgentCounters>, s: &Spend, f: impl Fn(&mut Counter)) {
    let Some(agent) = map.get_mut(s.agent.as_str()) else { return };
    for w in WINDOWS {
        for scope in SCOPES {
            let c = agent
                .windows
                .get_mut(&(w, window_start(s.at, w), scope))
                .and_then(|values| values.get_mut(s.scope_value(scope)));
            if let Some(c) = c {
                f(c);
            }
        }
    }
}

/// Counts an action (and its amount). Sums saturate: an amount no budget caps must not be able
/// to overflow a counter.
fn count_action(map: &mut HashMap<String, AgentCounters>, spend: &Spend) {
    add(map, spend, spend.at, |c| {
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

fn uncount_action(map: &mut HashMap<String, AgentCounters>, spend: &Spend) {
    take_back(map, spend, |c| {
        c.count = c.count.saturating_sub(1);
        if let Some((amt, cur)) = &spend.amount
            && let Some(s) = c.spend.get_mut(cur)
        {
            *s = s.saturating_sub(*amt);
        }
    });
}

fn count_tokens(map: &mut HashMap<String, AgentCounters>, t: &TokenUse) {
    let s = Spend {
        agent: t.agent.clone(),
        connector: t.connector.clone(),
        action: t.action.clone(),
        amount: None,
        at: t.at,
    };
    add(map, &s, t.at, |c| c.tokens = c.tokens.saturating_add(t.tokens));
}

impl Budgets {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts what a committed entry recorded (used when rebuilding from the log; see
    /// [`recorded_spend`]).
    pub(crate) fn record(&self, counted: &Counted) {
        let mut st = self.lock();
        match counted {
            Counted::Action(spend) => count_action(&mut st.agents, spend),
            Counted::Tokens(t) => count_tokens(&mut st.agents, t),
        }
    }

    /// Atomically checks every budget of `manifest` ([`admit`]) and, if none is spent, holds
    /// the request under `ask.id`: its action counted (in every window and scope, also without
    /// budgets: see the module comment) and its token estimate reserved. Idempotent: an id
    /// already held is not reserved twice.
    pub(crate) fn reserve(&self, manifest: &Manifest, ask: Ask) -> BudgetCheck {
        let mut st = self.lock();
        if st.held.contains_key(&ask.id) {
            return BudgetCheck::Reserved { reservation: Reservation { id: ask.id, shared: false }, threshold: None };
        }
        let agents = &st.agents;
        let spend = &ask.spend;
        let verdict = admit(manifest, &ask, |b| {
            let c = agents
                .get(spend.agent.as_str())
                .and_then(|a| a.windows.get(&(b.window, window_start(spend.at, b.window), b.scope)))
                .and_then(|values| values.get(spend.scope_value(b.scope)));
            let currency = spend.amount.as_ref().map(|(_, cur)| cur.as_str());
            c.map_or_else(Used::default, |c| Used {
                count: c.count,
                spend: currency.and_then(|cur| c.spend.get(cur)).copied().unwrap_or_default(),
                tokens: c.tokens,
                reserved: c.reserved,
            })
        });
        let threshold = match verdict {
            Err(r) => return BudgetCheck::Exceeded(r),
            Ok(t) => t,
        };
        count_action(&mut st.agents, &ask.spend);
        if let Some(n) = ask.tokens {
            add(&mut st.agents, &ask.spend, ask.spend.at, |c| c.reserved = c.reserved.saturating_add(n));
        }
        let id = ask.id.clone();
        st.held.insert(
            ask.id,
            Held {
                spend: ask.spend,
                action: true,
                tokens: ask.tokens,
                forwarded: false,
                since: crate::clock::instant(),
            },
        );
        BudgetCheck::Reserved { reservation: Reservation { id, shared: false }, threshold }
    }

    /// Ends what request `id` holds (see [`Settlement`]). Idempotent: settling an id that holds
    /// nothing (any more) changes nothing, except that [`Settlement::Tokens`] always counts its
    /// tokens — its caller, the outcome writer, settles once.
    pub(crate) fn settle(&self, id: &str, settlement: Settlement) {
        let mut st = self.lock();
        let State { agents, held } = &mut *st;
        match settlement {
            Settlement::Release => {
                if held.get(id).is_some_and(|h| !h.forwarded)
                    && let Some(h) = held.remove(id)
                {
                    if h.action {
                        uncount_action(agents, &h.spend);
                    }
                    release_tokens(agents, &h);
                }
            }
            Settlement::Forwarded { counted } => {
                let Some(h) = held.get_mut(id).filter(|h| !h.forwarded) else { return };
                if h.action && !counted {
                    uncount_action(agents, &h.spend);
                }
                h.action = false;
                h.forwarded = true;
                if h.tokens.is_none() {
                    held.remove(id);
                }
            }
            Settlement::Tokens(t) => {
                if let Some(h) = held.remove(id) {
                    release_tokens(agents, &h);
                }
                if t.tokens > 0 {
                    count_tokens(agents, &t);
                }
            }
        }
    }

    /// Releases reservations held longer than `max_age` by requests that were never forwarded
    /// nor released: the backstop for a request whose handling was cancelled between reserve
    /// and forward (its client went away while its decision was being recorded), so a lost
    /// request cannot hold an agent's budget for the rest of the window. A forwarded call is
    /// never expired: its outcome settles it. Returns how many were released.
    pub(crate) fn expire_unforwarded(&self, max_age: Duration) -> usize {
        let mut st = self.lock();
        let State { agents, held } = &mut *st;
        let stale: Vec<String> = held
            .iter()
            .filter(|(_, h)| !h.forwarded && crate::clock::since(h.since) > max_age)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &stale {
            if let Some(h) = held.remove(id) {
                if h.action {
                    uncount_action(agents, &h.spend);
                }
                release_tokens(agents, &h);
            }
        }
        stale.len()
    }

    /// Requests holding a reservation now (calls in flight, and requests between reserve and
    /// forward).
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    fn counter<T: Default>(
        &self,
        agent: &str,
        window: Window,
        scope: Scope,
        value: &str,
        at: i64,
        f: impl Fn(&Counter) -> T,
    ) -> T {
        let st = self.lock();
        st.agents
            .get(agent)
            .and_then(|a| a.windows.get(&(window, window_start(at, window), scope)))
            .and_then(|values| values.get(value))
            .map_or_else(T::default, f)
    }

    /// Tokens counted (charged) so far in the window containing `at` for one scope value.
    pub fn used_tokens(&self, agent: &str, window: Window, scope: Scope, value: &str, at: i64) -> u64 {
        self.counter(agent, window, scope, value, at, |c| c.tokens)
    }

    /// Token estimates held by calls in flight in the window containing `at` for one scope value.
    pub fn reserved_tokens(&self, agent: &str, window: Window, scope: Scope, value: &str, at: i64) -> u64 {
        self.counter(agent, window, scope, value, at, |c| c.reserved)
    }

    /// Actions counted so far in the window containing `at` for one scope value.
    pub fn used(&self, agent: &str, window: Window, scope: Scope, value: &str, at: i64) -> u64 {
        self.counter(agent, window, scope, value, at, |c| c.count)
    }
}

/// Gives back the token estimate `h` holds (in the windows it was reserved in).
fn release_tokens(agents: &mut HashMap<String, AgentCounters>, h: &Held) {
    if let Some(n) = h.tokens {
        take_back(agents, &h.spend, |c| c.reserved = c.reserved.saturating_sub(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Scope, Window};
    use crate::limits::test_support::manifest;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    fn spend(amount: Option<&str>, at: i64) -> Spend {
        Spend {
            agent: "unit-agent".into(),
            connector: "pay".into(),
            action: "payment.refund".into(),
            amount: amount.map(|a| (a.parse().unwrap(), "USD".to_string())),
            at,
        }
    }

    const T: i64 = 1_800_000_000; // a fixed instant inside a UTC day

    /// A reservation request under a fresh request id.
    fn ask(spend: Spend) -> Ask {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Ask { id: format!("req-{}", NEXT.fetch_add(1, Ordering::Relaxed)), spend, tokens: None }
    }

    /// Reserves `spend` and keeps it (the request was forwarded and counts).
    fn forwarded(b: &Budgets, r: Reservation) {
        b.settle(r.id(), Settlement::Forwarded { counted: true });
    }

    #[test]
    fn concurrent_reservations_take_exactly_the_remainder() {
        let m = Arc::new(manifest("  budgets:\n    - window: day\n      max_actions: 5\n"));
        let b = Arc::new(Budgets::new());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let (m, b) = (m.clone(), b.clone());
                std::thread::spawn(move || match b.reserve(&m, ask(spend(None, T))) {
                    BudgetCheck::Reserved { reservation, .. } => {
                        b.settle(reservation.id(), Settlement::Forwarded { counted: true });
                        true
                    }
                    BudgetCheck::Exceeded(r) => {
                        assert_eq!(r.code, "budget_exceeded");
                        false
                    }
                })
            })
            .collect();
        let won = threads.into_iter().map(|t| t.join().unwrap()).filter(|&w| w).count();
        assert_eq!(won, 5);
        assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 5);
        // The next UTC day starts fresh.
        assert!(matches!(b.reserve(&m, ask(spend(None, T + 86_400))), BudgetCheck::Reserved { .. }));
    }

    #[test]
    fn released_reservations_do_not_count() {
        let m = manifest("  budgets:\n    - window: hour\n      scope: action\n      max_actions: 1\n");
        let b = Budgets::new();
        let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, ask(spend(None, T))) else { panic!() };
        assert!(matches!(b.reserve(&m, ask(spend(None, T))), BudgetCheck::Exceeded(_)));
        b.settle(reservation.id(), Settlement::Release);
        assert!(matches!(b.reserve(&m, ask(spend(None, T))), BudgetCheck::Reserved { .. }));
    }

    #[test]
    fn spend_caps_and_threshold() {
        let m = manifest(
            "  budgets:\n    - window: day\n      max_actions: 10\n      escalate_at_percent: 50\n      max_spend: { USD: \"100.00\" }\n",
        );
        let b = Budgets::new();
        for _ in 0..4 {
            let BudgetCheck::Reserved { reservation, threshold } = b.reserve(&m, ask(spend(Some("10"), T))) else {
                panic!()
            };
            assert!(threshold.is_none());
            forwarded(&b, reservation);
        }
        // 50 of 100 USD reached with this one: escalate.
        let BudgetCheck::Reserved { reservation, threshold } = b.reserve(&m, ask(spend(Some("10"), T))) else {
            panic!()
        };
        assert_eq!(threshold.unwrap().code, "budget_threshold_reached");
        forwarded(&b, reservation);
        // 50 + 60 > 100: exceeded, and nothing was counted.
        let BudgetCheck::Exceeded(r) = b.reserve(&m, ask(spend(Some("60"), T))) else { panic!() };
        assert!(r.message.contains("100"), "{}", r.message);
        assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 5);
    }

    #[test]
    fn one_counting_rule_for_runtime_and_rebuild() {
        use serde_json::json;
        assert!(counts_toward_budgets("allow", Some("/v1/refunds")));
        assert!(!counts_toward_budgets("allow", None), "a tunnel authorisation is not an action");
        assert!(!counts_toward_budgets("escalate", Some("/v1/refunds")), "dry-run escalations are not ALLOWs");
        assert!(!counts_toward_budgets("deny", Some("/v1/refunds")));
        let allowed = json!({"kind": "decision", "decision": "allow", "agent": "unit-agent", "connector": "pay",
            "route": "/v1/refunds", "action": "payment.refund", "params": {"amount": "12.34", "currency": "USD"},
            "ts": "2027-01-15T08:00:00Z"});
        let Some(Counted::Action(s)) = recorded_spend(&allowed, 0) else { panic!("counts as an action") };
        assert_eq!(
            (s.agent.as_str(), s.connector.as_str(), s.action.as_str()),
            ("unit-agent", "pay", "payment.refund")
        );
        assert_eq!(s.amount, Some(("12.34".parse().unwrap(), "USD".to_string())));
        assert_eq!(s.at, T, "the entry's ts dates it");
        let tunnel = json!({"kind": "decision", "decision": "allow", "agent": "unit-agent", "connector": "pay",
            "action": "tunnel.intercept", "method": "CONNECT", "params": {}});
        assert!(recorded_spend(&tunnel, 0).is_none());
        for (k, v) in [("decision", "escalate"), ("decision", "deny"), ("kind", "outcome")] {
            let mut e = allowed.clone();
            e[k] = json!(v);
            assert!(recorded_spend(&e, 0).is_none(), "{k}={v}");
        }
    }

    #[test]
    fn huge_amounts_and_limits_never_overflow_a_budget() {
        const MAX: &str = "79228162514264337593543950335"; // Decimal::MAX
        let m = manifest(&format!(
            "  budgets:\n    - window: day\n      max_actions: 18446744073709551615\n      escalate_at_percent: 99\n      max_spend: {{ USD: \"{MAX}\" }}\n"
        ));
        let b = Budgets::new();
        let BudgetCheck::Reserved { reservation, threshold } = b.reserve(&m, ask(spend(Some(MAX), T))) else {
            panic!()
        };
        assert_eq!(threshold.expect("at 100% of the cap").code, "budget_threshold_reached");
        forwarded(&b, reservation);
        // MAX + 1 is no decimal: exceeded (fail closed), not a panic.
        let BudgetCheck::Exceeded(r) = b.reserve(&m, ask(spend(Some("1"), T))) else { panic!() };
        assert_eq!(r.code, "budget_exceeded");
        // Without any budget, counting saturates.
        let none = manifest("  amount_caps: {}\n");
        for _ in 0..3 {
            let BudgetCheck::Reserved { reservation, threshold: None } = b.reserve(&none, ask(spend(Some(MAX), T)))
            else {
                panic!()
            };
            forwarded(&b, reservation);
        }
        assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 4);
    }

    #[test]
    fn windows_that_are_over_are_forgotten_and_releases_never_resurrect_them() {
        let m = manifest("  budgets:\n    - window: hour\n      max_actions: 1\n");
        let b = Budgets::new();
        let BudgetCheck::Reserved { reservation: old, .. } = b.reserve(&m, ask(spend(None, T))) else { panic!() };
        // The next hour: a fresh window, and the previous one is dropped.
        let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, ask(spend(None, T + 3600))) else { panic!() };
        forwarded(&b, reservation);
        assert_eq!(b.used("unit-agent", Window::Hour, Scope::Agent, "unit-agent", T), 0);
        b.settle(old.id(), Settlement::Release);
        assert_eq!(b.used("unit-agent", Window::Hour, Scope::Agent, "unit-agent", T), 0);
        assert_eq!(b.used("unit-agent", Window::Hour, Scope::Agent, "unit-agent", T + 3600), 1);
        // The day window holds both hours.
        assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 1);
        assert!(matches!(b.reserve(&m, ask(spend(None, T + 3601))), BudgetCheck::Exceeded(_)));
    }

    fn tokens(n: u64, at: i64) -> TokenUse {
        TokenUse { agent: "unit-agent".into(), connector: "pay".into(), action: "payment.refund".into(), tokens: n, at }
    }

    #[test]
    fn token_budgets_refuse_once_the_window_total_reaches_the_cap() {
        let m = manifest("  budgets:\n    - window: hour\n      scope: connector\n      max_tokens: 100\n");
        let b = Budgets::new();
        // Requests pass while the recorded total is below the cap; the one that crosses it has
        // already been forwarded (its usage is only known when it ends).
        for used in [0, 60] {
            match b.reserve(&m, ask(spend(None, T))) {
                BudgetCheck::Reserved { reservation, threshold } => {
                    assert!(threshold.is_none());
                    forwarded(&b, reservation);
                }
                BudgetCheck::Exceeded(r) => panic!("refused at {used} tokens: {}", r.message),
            }
            b.record(&Counted::Tokens(tokens(60, T)));
        }
        assert_eq!(b.used_tokens("unit-agent", Window::Hour, Scope::Connector, "pay", T), 120);
        assert_eq!(b.used("unit-agent", Window::Hour, Scope::Connector, "pay", T), 2, "tokens are not actions");
        let BudgetCheck::Exceeded(r) = b.reserve(&m, ask(spend(None, T))) else { panic!("the cap was crossed") };
        assert_eq!(r.code, "budget_exceeded");
        assert!(r.message.contains("120/100 tokens"), "{}", r.message);
        // The next hour starts afresh.
        assert!(matches!(b.reserve(&m, ask(spend(None, T + 3600))), BudgetCheck::Reserved { .. }));
        // Another connector's window is its own.
        let mut other = spend(None, T);
        other.connector = "other".into();
        assert!(matches!(b.reserve(&m, ask(other)), BudgetCheck::Reserved { .. }));
    }

    #[test]
    fn token_budgets_reach_the_cap_exactly_and_escalate_at_the_threshold() {
        let m = manifest("  budgets:\n    - window: day\n      max_tokens: 1000\n      escalate_at_percent: 80\n");
        let b = Budgets::new();
        b.record(&Counted::Tokens(tokens(800, T)));
        let BudgetCheck::Reserved { reservation, threshold: Some(t) } = b.reserve(&m, ask(spend(None, T))) else {
            panic!("80% escalates")
        };
        b.settle(reservation.id(), Settlement::Release);
        assert_eq!(t.code, "budget_threshold_reached");
        b.record(&Counted::Tokens(tokens(200, T)));
        assert!(matches!(b.reserve(&m, ask(spend(None, T))), BudgetCheck::Exceeded(_)), "1000/1000 is spent");
        // Saturating: absurd totals never wrap around to a small count.
        b.record(&Counted::Tokens(tokens(u64::MAX, T)));
        assert!(matches!(b.reserve(&m, ask(spend(None, T))), BudgetCheck::Exceeded(_)));
    }

    #[test]
    fn outcome_entries_count_their_recorded_tokens_at_rebuild() {
        use serde_json::json;
        let outcome = json!({"kind": "outcome", "agent": "unit-agent", "connector": "pay", "action": "payment.refund",
            "usage": {"input_tokens": "30", "output_tokens": "12", "total_tokens": "42"},
            "ts": "2027-01-15T08:00:00Z"});
        let Some(Counted::Tokens(t)) = recorded_spend(&outcome, 0) else { panic!("tokens count") };
        assert_eq!((t.tokens, t.at, t.connector.as_str()), (42, T, "pay"));
        // The same rule the outcome writer uses.
        assert_eq!(usage_tokens(&outcome), Some(42));
        assert_eq!(usage_tokens(&json!({"usage": {"total_tokens": 42}})), Some(42));
        for unknown in [
            json!(null),
            json!({"total_tokens": "-1"}),
            json!({"total_tokens": "x"}),
            json!({}),
            json!({"total_tokens": "0"}),
        ] {
            let mut e = outcome.clone();
            e["usage"] = unknown.clone();
            assert!(recorded_spend(&e, 0).is_none(), "{unknown}");
        }
        let b = Budgets::new();
        let c = recorded_spend(&outcome, 0).unwrap();
        b.record(&c);
        b.record(&c);
        assert_eq!(b.used_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 84);
        assert_eq!(b.used_tokens("unit-agent", Window::Hour, Scope::Action, "payment.refund", T), 84);
        assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 0);
    }

    /// An LLM call's reservation: its action and a token estimate.
    fn llm(estimate: u64, at: i64) -> Ask {
        Ask { tokens: Some(estimate), ..ask(spend(None, at)) }
    }

    #[test]
    fn concurrent_llm_calls_overshoot_by_at_most_one_estimate() {
        let m = Arc::new(manifest("  budgets:\n    - window: day\n      max_tokens: 2000\n"));
        for round in 0..10 {
            let b = Arc::new(Budgets::new());
            let start = Arc::new(std::sync::Barrier::new(40));
            let threads: Vec<_> = (0..40)
                .map(|_| {
                    let (m, b, start) = (m.clone(), b.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        match b.reserve(&m, llm(125, T)) {
                            BudgetCheck::Reserved { reservation, .. } => Some(reservation),
                            BudgetCheck::Exceeded(r) => {
                                assert_eq!(r.code, "budget_exceeded");
                                assert!(r.message.contains("reserved by calls in flight"), "{}", r.message);
                                None
                            }
                        }
                    })
                })
                .collect();
            let admitted: Vec<Reservation> = threads.into_iter().filter_map(|t| t.join().unwrap()).collect();
            // Admitted while counted + reserved < 2000: 16 estimates of 125 (the 16th starts at 1875).
            assert_eq!(admitted.len(), 2000_usize.div_ceil(125), "round {round}");
            assert_eq!(b.reserved_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 16 * 125);
            for r in &admitted {
                b.settle(r.id(), Settlement::Forwarded { counted: true });
                b.settle(r.id(), Settlement::Tokens(tokens(125, T)));
            }
            assert_eq!(b.used_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 2000);
            assert_eq!(b.reserved_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 0);
            assert_eq!(b.held(), 0);
            assert!(matches!(b.reserve(&m, llm(1, T)), BudgetCheck::Exceeded(_)));
        }
    }

    #[test]
    fn an_estimate_above_the_cap_admits_one_call_at_a_time_and_settles_to_the_usage() {
        let m = manifest("  budgets:\n    - window: day\n      scope: connector\n      max_tokens: 2000\n");
        let b = Budgets::new();
        let BudgetCheck::Reserved { reservation: first, .. } = b.reserve(&m, llm(4103, T)) else { panic!() };
        let BudgetCheck::Exceeded(r) = b.reserve(&m, llm(4103, T)) else { panic!("one estimate is in flight") };
        assert!(r.message.contains("0/2000 tokens (4103 more reserved by calls in flight)"), "{}", r.message);
        b.settle(first.id(), Settlement::Forwarded { counted: true });
        // Its usage was read: 60 tokens, not the estimate.
        b.settle(first.id(), Settlement::Tokens(tokens(60, T)));
        assert_eq!(b.used_tokens("unit-agent", Window::Day, Scope::Connector, "pay", T), 60);
        assert_eq!(b.reserved_tokens("unit-agent", Window::Day, Scope::Connector, "pay", T), 0);
        let BudgetCheck::Reserved { reservation: second, .. } = b.reserve(&m, llm(4103, T)) else { panic!() };
        b.settle(second.id(), Settlement::Forwarded { counted: true });
        // Its usage could not be read: charged the estimate; the window is spent.
        b.settle(second.id(), Settlement::Tokens(tokens(token_charge(None, 4103), T)));
        let BudgetCheck::Exceeded(r) = b.reserve(&m, llm(10, T)) else { panic!() };
        assert!(r.message.contains("4163/2000 tokens"), "{}", r.message);
        assert_eq!(token_charge(Some(60), 4103), 60);
    }

    #[test]
    fn settling_is_explicit_idempotent_and_by_request_id() {
        let m = manifest("  budgets:\n    - window: day\n      max_actions: 10\n      max_tokens: 100000\n");
        let b = Budgets::new();
        let used = |b: &Budgets| {
            (
                b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T),
                b.reserved_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T),
                b.used_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T),
            )
        };
        // Released twice: given back once.
        let a = llm(500, T);
        let id = a.id.clone();
        let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, a.clone()) else { panic!() };
        // Reserving the same id again holds nothing more.
        let BudgetCheck::Reserved { reservation: again, .. } = b.reserve(&m, a) else { panic!() };
        assert_eq!((reservation.id(), again.id()), (id.as_str(), id.as_str()));
        assert_eq!(used(&b), (1, 500, 0));
        b.settle(&id, Settlement::Release);
        b.settle(&id, Settlement::Release);
        assert_eq!(used(&b), (0, 0, 0));
        // Forwarded: released later is a no-op; the estimate stays held until the tokens settle.
        let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, llm(500, T)) else { panic!() };
        b.settle(reservation.id(), Settlement::Forwarded { counted: true });
        b.settle(reservation.id(), Settlement::Forwarded { counted: true });
        b.settle(reservation.id(), Settlement::Release);
        assert_eq!(used(&b), (1, 500, 0));
        assert_eq!(b.held(), 1);
        b.settle(reservation.id(), Settlement::Tokens(tokens(42, T)));
        b.settle(reservation.id(), Settlement::Release);
        assert_eq!(used(&b), (1, 0, 42));
        assert_eq!(b.held(), 0);
        // Forwarded but not counted (a dry-run escalation): the action goes back, the estimate stays.
        let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, llm(7, T)) else { panic!() };
        b.settle(reservation.id(), Settlement::Forwarded { counted: false });
        assert_eq!(used(&b), (1, 7, 42));
        b.settle(reservation.id(), Settlement::Tokens(tokens(7, T)));
        assert_eq!(used(&b), (1, 0, 49));
        // A call forwarded without a reservation (dry run) still counts its tokens.
        b.settle("never-reserved", Settlement::Tokens(tokens(1, T)));
        assert_eq!(used(&b), (1, 0, 50));
    }

    #[test]
    fn concurrent_settles_of_one_reservation_give_back_once() {
        let m = Arc::new(manifest("  budgets:\n    - window: day\n      max_actions: 100\n      max_tokens: 100000\n"));
        for round in 0..10 {
            let b = Arc::new(Budgets::new());
            for _ in 0..3 {
                let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, ask(spend(None, T))) else { panic!() };
                b.settle(reservation.id(), Settlement::Forwarded { counted: true });
            }
            let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, llm(900, T)) else { panic!() };
            let id = reservation.id().to_string();
            let start = Arc::new(std::sync::Barrier::new(16));
            let threads: Vec<_> = (0..16)
                .map(|i| {
                    let (b, id, start) = (b.clone(), id.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        // Racing releases and one forward: whichever lands first decides.
                        let s = if i == 7 { Settlement::Forwarded { counted: true } } else { Settlement::Release };
                        b.settle(&id, s);
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
            let count = b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T);
            let reserved = b.reserved_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T);
            // Released (3 actions, nothing held) or forwarded first (4 actions, the estimate held).
            assert!(
                matches!((count, reserved, b.held()), (3, 0, 0) | (4, 900, 1)),
                "round {round}: {count} {reserved}"
            );
        }
    }

    #[test]
    fn requests_that_reserve_no_tokens_are_refused_only_by_counted_tokens() {
        let m = manifest("  budgets:\n    - window: day\n      max_tokens: 1000\n");
        let b = Budgets::new();
        let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, llm(5000, T)) else { panic!() };
        b.settle(reservation.id(), Settlement::Forwarded { counted: true });
        assert!(matches!(b.reserve(&m, llm(1, T)), BudgetCheck::Exceeded(_)), "an LLM call waits for the estimate");
        assert!(matches!(b.reserve(&m, ask(spend(None, T))), BudgetCheck::Reserved { .. }), "other calls do not");
    }

    #[test]
    fn reservations_never_forwarded_nor_settled_expire() {
        let m = manifest("  budgets:\n    - window: day\n      max_actions: 10\n      max_tokens: 1000\n");
        let b = Budgets::new();
        let BudgetCheck::Reserved { reservation: lost, .. } = b.reserve(&m, llm(900, T)) else { panic!() };
        let BudgetCheck::Reserved { reservation: sent, .. } = b.reserve(&m, ask(spend(None, T))) else { panic!() };
        b.settle(sent.id(), Settlement::Forwarded { counted: true });
        let BudgetCheck::Reserved { reservation: streaming, .. } = b.reserve(&m, ask(spend(None, T))) else { panic!() };
        b.settle(streaming.id(), Settlement::Forwarded { counted: true });
        assert_eq!(b.expire_unforwarded(Duration::from_secs(3600)), 0, "not old enough");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(b.expire_unforwarded(Duration::ZERO), 1);
        assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 2);
        assert_eq!(b.reserved_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 0);
        b.settle(lost.id(), Settlement::Release);
        assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 2);
    }

    #[test]
    fn the_charged_tokens_are_what_the_outcome_entry_records() {
        use serde_json::json;
        let entry = |usage: serde_json::Value, charged: Option<&str>| {
            let mut e = json!({"kind": "outcome", "agent": "unit-agent", "connector": "pay", "action": "payment.refund",
                "usage": usage, "ts": "2027-01-15T08:00:00Z"});
            if let Some(c) = charged {
                e["usage_charged"] = json!(c);
            }
            e
        };
        // Usage unknown: the estimate charged counts.
        assert_eq!(usage_tokens(&entry(json!(null), Some("4103"))), Some(4103));
        // Usage read: usage_charged is its total.
        assert_eq!(usage_tokens(&entry(json!({"total_tokens": "42"}), Some("42"))), Some(42));
        // Nothing sent: nothing counts.
        assert!(recorded_spend(&entry(json!(null), Some("0")), 0).is_none());
        // Entries from before usage_charged: their total.
        assert_eq!(usage_tokens(&entry(json!({"total_tokens": "42"}), None)), Some(42));
        assert_eq!(usage_tokens(&entry(json!(null), None)), None);
        // Runtime and rebuild agree.
        let rebuilt = Budgets::new();
        let runtime = Budgets::new();
        let m = manifest("  budgets:\n    - window: day\n      max_tokens: 100000\n");
        for (e, read) in
            [(entry(json!(null), Some("4103")), None), (entry(json!({"total_tokens": "42"}), Some("42")), Some(42))]
        {
            let Some(Counted::Tokens(t)) = recorded_spend(&e, 0) else { panic!() };
            rebuilt.record(&Counted::Tokens(t));
            let BudgetCheck::Reserved { reservation, .. } = runtime.reserve(&m, llm(4103, T)) else { panic!() };
            runtime.settle(reservation.id(), Settlement::Forwarded { counted: true });
            runtime.settle(reservation.id(), Settlement::Tokens(tokens(token_charge(read, 4103), T)));
        }
        let at = |b: &Budgets| b.used_tokens("unit-agent", Window::Day, Scope::Agent, "unit-agent", T);
        assert_eq!((at(&rebuilt), at(&runtime)), (4145, 4145));
    }
}
