use super::*;
use crate::config::{Strictness, load_manifest};

fn manifest(policy: &str) -> Manifest {
    let text = format!(
        "apiVersion: uapk/v1\nkind: Manifest\nagent: {{ id: unit-agent }}\ncapability: {{ required: false }}\nconnectors:\n  - name: pay\n    base_url: https://pay.example.com\npolicy:\n{policy}"
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

#[test]
fn concurrent_reservations_take_exactly_the_remainder() {
    let m = Arc::new(manifest("  budgets:\n    - window: day\n      max_actions: 5\n"));
    let b = Arc::new(Budgets::new());
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let (m, b) = (m.clone(), b.clone());
            std::thread::spawn(move || match b.reserve(&m, spend(None, T)) {
                BudgetCheck::Reserved { reservation, .. } => {
                    reservation.commit();
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
    assert!(matches!(b.reserve(&m, spend(None, T + 86_400)), BudgetCheck::Reserved { .. }));
}

#[test]
fn released_reservations_do_not_count() {
    let m = manifest("  budgets:\n    - window: hour\n      scope: action\n      max_actions: 1\n");
    let b = Budgets::new();
    let BudgetCheck::Reserved { reservation, .. } = b.reserve(&m, spend(None, T)) else { panic!() };
    assert!(matches!(b.reserve(&m, spend(None, T)), BudgetCheck::Exceeded(_)));
    b.release(reservation);
    assert!(matches!(b.reserve(&m, spend(None, T)), BudgetCheck::Reserved { .. }));
}

#[test]
fn spend_caps_and_threshold() {
    let m = manifest(
        "  budgets:\n    - window: day\n      max_actions: 10\n      escalate_at_percent: 50\n      max_spend: { USD: \"100.00\" }\n",
    );
    let b = Budgets::new();
    for _ in 0..4 {
        let BudgetCheck::Reserved { reservation, threshold } = b.reserve(&m, spend(Some("10"), T)) else { panic!() };
        assert!(threshold.is_none());
        reservation.commit();
    }
    // 50 of 100 USD reached with this one: escalate.
    let BudgetCheck::Reserved { reservation, threshold } = b.reserve(&m, spend(Some("10"), T)) else { panic!() };
    assert_eq!(threshold.unwrap().code, "budget_threshold_reached");
    reservation.commit();
    // 50 + 60 > 100: exceeded, and nothing was counted.
    let BudgetCheck::Exceeded(r) = b.reserve(&m, spend(Some("60"), T)) else { panic!() };
    assert!(r.message.contains("100"), "{}", r.message);
    assert_eq!(b.used("unit-agent", Window::Day, Scope::Agent, "unit-agent", T), 5);
}

#[test]
fn rate_limits_refuse_above_the_burst_and_say_when_to_retry() {
    let m = manifest("  rate_limits:\n    - rate: 10/s\n      burst: 5\n");
    let rl = RateLimiters::new();
    let ok = (0..20).filter(|_| rl.check(&m, "pay", "a").is_ok()).count();
    assert!((5..=6).contains(&ok), "{ok}");
    let e = rl.check(&m, "pay", "a").unwrap_err();
    assert_eq!(e.reason.code, "rate_limited");
    assert_eq!(e.retry_after, Duration::from_secs(1));
    assert_eq!(e.policy, "\"agent\";q=10;w=1");
    assert!(rl.sweep() >= 1);
}
