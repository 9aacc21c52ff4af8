//! Unit tests of the pure engine: one manifest, requests described as facts.

use super::*;
use crate::config::{Manifest, Strictness, load_manifest};
use http::{HeaderMap, HeaderValue, Method};

const MANIFEST: &str = r#"apiVersion: uapk/v1
kind: Manifest
agent: { id: unit-agent }
capability: { required: false }
connectors:
  - name: pay
    base_url: https://pay.example.com
    routes:
      - methods: [POST]
        path: /refunds
        action: payment.refund
        params:
          amount:       { json: /amount, scale: 2 }
          currency:     { json: /currency }
          counterparty: { json: /customer }
          jurisdiction: { header: x-country }
      - methods: [POST]
        path: /transfers/{to}
        action: payment.transfer
        params:
          amount:       { query: amount }
          currency:     { query: cur }
          counterparty: { path: to }
      - methods: [GET]
        path: /charges/**
        action: payment.read
      - methods: [DELETE]
        path: /charges/*
        action: payment.delete
  - name: crm
    base_url: https://crm.example.com
    routes:
      - path: /**
        action: crm.any
policy:
  connectors: { allow: [pay, crm], deny: [crm] }
  action_types: { deny: [payment.delete] }
  amount_caps: { USD: "100.00" }
  approval:
    action_types: [payment.transfer]
    amount_above: { USD: "50.00" }
  jurisdictions: { allow: [US] }
  counterparties: { allow: [cus_a, cus_b, acct_1], deny: [cus_b] }
"#;

fn manifest() -> Manifest {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.yaml");
    std::fs::write(&p, MANIFEST).unwrap();
    load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}")).0
}

/// Classifies and evaluates a request the way the proxy does.
fn decide(
    m: &Manifest,
    conn: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Decision {
    let c = m.connector(conn).unwrap();
    if let Err(d) = check_connector(m, None, c) {
        return d;
    }
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let Some((route, caps)) = c.route(&method, path) else {
        return Decision::deny("route_not_allowed", "no route");
    };
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    let params = extract_params(route, &caps, &h, query, body.map(str::as_bytes));
    evaluate(m, None, &Action { connector: c, route, params: &params })
}

fn refund(m: &Manifest, body: &str, country: &str) -> Decision {
    decide(m, "pay", Method::POST, "/refunds", &[("x-country", country)], Some(body))
}

#[test]
fn allow_carries_all_checks_passed() {
    let m = manifest();
    let d = refund(&m, r#"{"amount": 1000, "currency": "usd", "customer": "cus_a"}"#, "us");
    assert_eq!(d, Decision::allow());
    assert_eq!(decide(&m, "pay", Method::GET, "/charges/ch_1/lines", &[], None).verdict, Verdict::Allow);
}

#[test]
fn connector_and_action_lists() {
    let m = manifest();
    assert_eq!(decide(&m, "crm", Method::GET, "/x", &[], None).code(), "tool_not_allowed");
    assert_eq!(decide(&m, "pay", Method::DELETE, "/charges/ch_1", &[], None).code(), "action_type_not_allowed");
    assert_eq!(decide(&m, "pay", Method::PUT, "/refunds", &[], None).code(), "route_not_allowed");
}

#[test]
fn amounts_fail_closed() {
    let m = manifest();
    for amount in [r#""abc""#, r#""NaN""#, "-5", r#""-5""#, "12.5", r#""1e3""#, "null", "true", "[1]", "{}"] {
        let body = format!(r#"{{"amount": {amount}, "currency": "USD", "customer": "cus_a"}}"#);
        assert_eq!(refund(&m, &body, "US").code(), "amount_invalid", "{amount}");
    }
    assert_eq!(refund(&m, r#"{"currency": "USD", "customer": "cus_a"}"#, "US").code(), "amount_invalid");
    assert_eq!(refund(&m, "not json", "US").code(), "amount_invalid");
    // 1e400 is not even valid JSON for the parser: still amount_invalid, never skipped.
    assert_eq!(
        refund(&m, r#"{"amount": 1e400, "currency": "USD", "customer": "cus_a"}"#, "US").code(),
        "amount_invalid"
    );
    // A string of digits in minor units is fine.
    assert_eq!(
        refund(&m, r#"{"amount": "1000", "currency": "USD", "customer": "cus_a"}"#, "US").verdict,
        Verdict::Allow
    );
}

#[test]
fn caps_thresholds_and_currency() {
    let m = manifest();
    let r = |amount: u64, cur: &str| {
        refund(&m, &format!(r#"{{"amount": {amount}, "currency": "{cur}", "customer": "cus_a"}}"#), "US")
    };
    assert_eq!(r(5000, "USD").verdict, Verdict::Allow); // 50.00 is not above 50.00
    let d = r(5001, "USD");
    assert_eq!((d.verdict, d.code()), (Verdict::Escalate, "amount_requires_approval"));
    assert_eq!(r(10000, "usd").code(), "amount_requires_approval"); // at the cap: allowed by caps, escalated
    assert_eq!(r(10001, "USD").code(), "amount_exceeds_cap");
    assert_eq!(r(100, "EUR").code(), "currency_not_allowed");
}

#[test]
fn escalation_reasons_accumulate_and_a_deny_stops() {
    let m = manifest();
    // A transfer is an approval action type and 60.00 is above the amount threshold.
    let d = decide(&m, "pay", Method::POST, "/transfers/acct_1?amount=60&cur=USD", &[], None);
    assert_eq!(d.verdict, Verdict::Escalate);
    let codes: Vec<_> = d.reasons.iter().map(|r| r.code).collect();
    assert_eq!(codes, vec!["requires_human_approval", "amount_requires_approval"]);
    // The same transfer to a denied counterparty is denied, not escalated.
    let d = decide(&m, "pay", Method::POST, "/transfers/cus_b?amount=60&cur=USD", &[], None);
    assert_eq!((d.verdict, d.code()), (Verdict::Deny, "counterparty_denied"));
    // Query amounts are plain decimals (no scale here): 6000 is 6000 USD, above the cap.
    let d = decide(&m, "pay", Method::POST, "/transfers/acct_1?amount=6000&cur=USD", &[], None);
    assert_eq!(d.code(), "amount_exceeds_cap");
    let d = decide(&m, "pay", Method::POST, "/transfers/acct_1?amount=50.5&cur=USD", &[], None);
    assert_eq!(d.reasons.len(), 2);
}

#[test]
fn jurisdictions_and_counterparties() {
    let m = manifest();
    let body = |c: &str| format!(r#"{{"amount": 100, "currency": "USD", "customer": "{c}"}}"#);
    assert_eq!(refund(&m, &body("cus_a"), "FR").code(), "jurisdiction_not_allowed");
    assert_eq!(
        decide(&m, "pay", Method::POST, "/refunds", &[], Some(&body("cus_a"))).code(),
        "jurisdiction_not_allowed"
    );
    assert_eq!(refund(&m, &body("cus_b"), "US").code(), "counterparty_denied");
    assert_eq!(refund(&m, &body("cus_zzz"), "US").code(), "counterparty_not_in_allowlist");
    assert_eq!(refund(&m, r#"{"amount": 100, "currency": "USD"}"#, "US").code(), "counterparty_not_in_allowlist");
    // Percent-encoding in a path capture does not dodge the deny list.
    let d = decide(&m, "pay", Method::POST, "/transfers/cus%5Fb?amount=1&cur=USD", &[], None);
    assert_eq!(d.code(), "counterparty_denied");
}

#[test]
fn duplicate_param_sources_are_not_guessed() {
    let m = manifest();
    let d = decide(&m, "pay", Method::POST, "/transfers/acct_1?amount=1&amount=999&cur=USD", &[], None);
    assert_eq!(d.code(), "amount_invalid");
}
