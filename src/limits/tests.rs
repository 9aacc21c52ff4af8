use super::*;
use crate::config::{Manifest, Scope, Strictness, Window, load_manifest};
use crate::limits::budgets::usage_tokens;
use crate::limits::rate::LocalLimiters;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn manifest(policy: &str) -> Manifest {
    let text = format!(
        "apiVersion: uapk/v1\nkind: Manifest\nagent: {{ id: unit-agent }}\ncapability: {{ required: false }}\nconnectors:\n  - name: pay\n    base_url: https://pay.example.com\n    routes:\n      - {{ methods: [POST], path: /refunds, action: payment.refund, params: {{ amount: {{ form: amount }}, currency: {{ form: currency }} }} }}\npolicy:\n{policy}"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.yaml");
    std::fs::write(&p, text).unwrap();
    load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}")).0
}

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
    let BudgetCheck::Reserved { reservation, threshold } = b.reserve(&m, ask(spend(Some("10"), T))) else { panic!() };
    assert_eq!(threshold.unwrap().code, "budget_threshold_reached");
    forwarded(&b, reservation);
    // 50 + 60 > 100: exceeded, and nothing was counted.
    let BudgetCheck::Exceeded(r) = b.reserve(&m, ask(spend(Some("60"), T))) else { panic!() };
    assert!(r.message.contains("100"), "{}", r.message);
    assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 5);
}

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
    let quota = super::rate::quota_of(&m.policy.rate_limits[0]);
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
    let m = Arc::new(manifest(TWO_LIMITS.replace("rate: 1/h\n      burst: 1", "rate: 1/h\n      burst: 3").as_str()));
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
    assert_eq!((s.agent.as_str(), s.connector.as_str(), s.action.as_str()), ("unit-agent", "pay", "payment.refund"));
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
    let BudgetCheck::Reserved { reservation, threshold } = b.reserve(&m, ask(spend(Some(MAX), T))) else { panic!() };
    assert_eq!(threshold.expect("at 100% of the cap").code, "budget_threshold_reached");
    forwarded(&b, reservation);
    // MAX + 1 is no decimal: exceeded (fail closed), not a panic.
    let BudgetCheck::Exceeded(r) = b.reserve(&m, ask(spend(Some("1"), T))) else { panic!() };
    assert_eq!(r.code, "budget_exceeded");
    // Without any budget, counting saturates.
    let none = manifest("  amount_caps: {}\n");
    for _ in 0..3 {
        let BudgetCheck::Reserved { reservation, threshold: None } = b.reserve(&none, ask(spend(Some(MAX), T))) else {
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
        assert!(matches!((count, reserved, b.held()), (3, 0, 0) | (4, 900, 1)), "round {round}: {count} {reserved}");
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
