//! Unit tests of the pure engine: one manifest, requests described as facts.

use super::*;
use crate::config::{Manifest, Strictness, load_manifest};
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use std::path::Path;

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

/// A manifest from YAML text, validated as `check` does.
fn manifest_from(yaml: &str) -> Manifest {
    let (m, _) = crate::config::parse_manifest(Path::new("m.yaml"), yaml.as_bytes(), Path::new("."), Strictness::Check)
        .unwrap_or_else(|e| panic!("{e}"));
    m
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
    decide_as(m, None, conn, method, path, headers, body)
}

/// `decide` for an agent that presents a token with `claims`.
fn decide_as(
    m: &Manifest,
    claims: Option<&CapabilityClaims>,
    conn: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Decision {
    let c = m.connector(conn).unwrap();
    if let Err(d) = check_connector(m, claims, c) {
        return d;
    }
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let Some((route, caps)) = c.route(&method, path) else {
        return Decision::deny(Code::RouteNotAllowed, "no route");
    };
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    let params = extract_params(route, &caps, &h, query, body.map(str::as_bytes));
    evaluate(m, claims, &Action { connector: c, action: &route.action, params: &params })
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
    assert_eq!((d.verdict, d.code().as_str()), (Verdict::Escalate, "amount_requires_approval"));
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
    assert_eq!((d.verdict, d.code().as_str()), (Verdict::Deny, "counterparty_denied"));
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
    assert_eq!(d.code(), "param_ambiguous");
    let d = decide(&m, "pay", Method::POST, "/transfers/acct_1?amount=1;amount=999&cur=USD", &[], None);
    assert_eq!(d.code(), "param_ambiguous");
    let d = refund(&m, r#"{"amount": 100, "currency": "USD", "customer": "cus_a", "customer": "cus_b"}"#, "US");
    assert_eq!(d.code(), "param_ambiguous");
    assert!(d.reasons[0].message.contains("customer"), "{d:?}");
}

#[test]
fn listed_values_with_invisible_or_control_characters_are_invalid() {
    let m = manifest();
    let body = |c: &str| serde_json::json!({"amount": 100, "currency": "USD", "customer": c}).to_string();
    for c in ["cus_b\u{0}", "cus_\u{200b}b", "\u{feff}cus_b", "cus_b\u{a0}", "cus_a\u{2060}"] {
        let d = refund(&m, &body(c), "US");
        assert_eq!(d.code(), "param_invalid", "{c:?}: {d:?}");
        assert!(d.reasons[0].message.starts_with("counterparty holds U+"), "{d:?}");
    }
    // A jurisdiction (from a header, where a tab survives) and a path capture likewise.
    assert_eq!(refund(&m, &body("cus_a"), "U\tS").code(), "param_invalid");
    let d = decide(&m, "pay", Method::POST, "/transfers/cus%E2%80%8Bb?amount=1&cur=USD", &[], None);
    assert_eq!(d.code(), "param_invalid");
    // A param no list reads may hold anything.
    let free =
        manifest_from(&MANIFEST.replace("  counterparties: { allow: [cus_a, cus_b, acct_1], deny: [cus_b] }\n", ""));
    let d = refund(&free, &body("cus_\u{200b}b"), "US");
    assert_eq!(d.verdict, Verdict::Allow, "{d:?}");
    // The token's list makes it a listed value again.
    let mut c = claims();
    c.constraints = Some(crate::identity::Constraints {
        counterparties: Some(crate::identity::CounterpartyConstraint { allow: vec![], deny: vec!["cus_b".into()] }),
        ..Default::default()
    });
    let d = decide_as(
        &free,
        Some(&c),
        "pay",
        Method::POST,
        "/refunds",
        &[("x-country", "US")],
        Some(&body("cus_\u{200b}b")),
    );
    assert_eq!(d.code(), "param_invalid");
}

#[test]
fn lists_match_values_ascii_case_insensitively() {
    let m = manifest();
    let body = |c: &str| format!(r#"{{"amount": 100, "currency": "USD", "customer": "{c}"}}"#);
    assert_eq!(refund(&m, &body("CUS_B"), "US").code(), "counterparty_denied");
    assert_eq!(refund(&m, &body(" Cus_b "), "US").code(), "counterparty_denied");
    assert_eq!(refund(&m, &body("CUS_A"), "us").verdict, Verdict::Allow);
    // Lower-case lists in the manifest, upper-case values in the request.
    let m =
        manifest_from(&MANIFEST.replace("allow: [US]", "allow: [us]").replace("deny: [cus_b]", "deny: [\"cus_b*\"]"));
    assert_eq!(refund(&m, &body("cus_a"), "US").verdict, Verdict::Allow);
    assert_eq!(refund(&m, &body("CUS_B_2"), "US").code(), "counterparty_denied");
    // Token lists likewise.
    let mut c = claims();
    c.constraints = Some(crate::identity::Constraints {
        counterparties: Some(crate::identity::CounterpartyConstraint { allow: vec![], deny: vec!["cus_a".into()] }),
        ..Default::default()
    });
    let d = decide_as(&m, Some(&c), "pay", Method::POST, "/refunds", &[("x-country", "US")], Some(&body("CUS_A")));
    assert_eq!(d.code(), "token_counterparty_not_allowed");
}

fn claims() -> CapabilityClaims {
    CapabilityClaims {
        iss: "platform".into(),
        sub: "unit-agent".into(),
        aud: crate::identity::Audience::from(vec!["uapk-gateway".to_string()]),
        exp: i64::MAX / 2,
        iat: 0,
        nbf: None,
        jti: None,
        connectors: None,
        action_types: None,
        constraints: None,
    }
}

/// A payments manifest whose only money rule is `rule` (a `policy:` line), with a JSON refund
/// route and an MCP-style refund route that has no currency at all.
fn money_manifest(rule: &str) -> Manifest {
    manifest_from(&format!(
        r#"apiVersion: uapk/v1
kind: Manifest
agent: {{ id: unit-agent }}
capability: {{ required: false }}
connectors:
  - name: pay
    base_url: https://pay.example.com
    routes:
      - methods: [POST]
        path: /refunds
        action: payment.refund
        params:
          amount:   {{ json: /amount, scale: 2 }}
          currency: {{ json: /currency }}
      - methods: [POST]
        path: /tool-refund
        action: payment.refund
        params:
          amount: {{ json: /amount }}
policy:
{rule}
"#
    ))
}

#[test]
fn money_fails_closed_without_a_known_currency() {
    let rules = [
        "  amount_caps: { USD: \"100.00\" }",
        "  approval: { amount_above: { USD: \"50.00\" } }",
        "  budgets: [{ window: day, max_spend: { USD: \"1000\" } }]",
    ];
    for rule in rules {
        let m = money_manifest(rule);
        let r = |body: &str| decide(&m, "pay", Method::POST, "/refunds", &[], Some(body));
        for body in [
            r#"{"amount": 1000}"#,
            r#"{"amount": 1000, "currency": null}"#,
            r#"{"amount": 1000, "currency": ""}"#,
            r#"{"amount": 1000, "currency": "  "}"#,
            r#"{"amount": 1000, "currency": "US"}"#,
            r#"{"amount": 1000, "currency": "U$D"}"#,
            r#"{"amount": 1000, "currency": "USDX"}"#,
            r#"{"amount": 1000, "currency": 840}"#,
        ] {
            assert_eq!(r(body).code(), "currency_required", "{rule}: {body}");
        }
        assert_eq!(r(r#"{"amount": 1000, "currency": "EUR"}"#).code(), "currency_not_allowed", "{rule}");
        assert_ne!(r(r#"{"amount": 1000, "currency": " usd "}"#).verdict, Verdict::Deny, "{rule}");
        // The MCP-style call carries no currency at all.
        let d = decide(&m, "pay", Method::POST, "/tool-refund", &[], Some(r#"{"amount": 9999999}"#));
        assert_eq!(d.code(), "currency_required", "{rule}");
    }
    // The threshold still escalates a known currency.
    let m = money_manifest(rules[1]);
    let d = decide(&m, "pay", Method::POST, "/refunds", &[], Some(r#"{"amount": 7500, "currency": "usd"}"#));
    assert_eq!((d.verdict, d.code().as_str()), (Verdict::Escalate, "amount_requires_approval"));
    // A token cap is a money rule too, even when the manifest has none.
    let m = money_manifest("  action_types: { allow: [] }");
    let bare = r#"{"amount": 1000}"#;
    assert_eq!(decide(&m, "pay", Method::POST, "/refunds", &[], Some(bare)).verdict, Verdict::Allow);
    let mut c = claims();
    c.constraints = Some(crate::identity::Constraints {
        amount_max: [("USD".into(), "20".parse().unwrap())].into(),
        ..Default::default()
    });
    let d = decide_as(&m, Some(&c), "pay", Method::POST, "/refunds", &[], Some(bare));
    assert_eq!(d.code(), "currency_required");
    let d =
        decide_as(&m, Some(&c), "pay", Method::POST, "/refunds", &[], Some(r#"{"amount": 1000, "currency": "EUR"}"#));
    assert_eq!(d.code(), "currency_not_allowed");
    let d =
        decide_as(&m, Some(&c), "pay", Method::POST, "/refunds", &[], Some(r#"{"amount": 1000, "currency": "USD"}"#));
    assert_eq!(d.verdict, Verdict::Allow);
}

const LLM: &str = r#"apiVersion: uapk/v1
kind: Manifest
agent: { id: unit-agent }
capability: { required: false }
connectors:
  - name: llm
    base_url: https://llm.example.com
    routes:
      - methods: [POST]
        path: /chat
        action: llm.chat
        params:
          model: { json: /model }
      - methods: [POST]
        path: /tune
        action: llm.tune
        params:
          model:       { json: /model }
          temperature: { json: /temperature }
      - methods: [POST]
        path: /refund
        action: payment.refund
        params:
          amount:   { form: amount }
          currency: { value: usd }
      - methods: [GET]
        path: /models
        action: llm.models
policy:
  params:
    model:       { allow: [gpt-4o-mini, "gpt-4o-2024*"], deny: [gpt-4o-2024-05-13] }
    temperature: { min: "0", max: "1.5" }
    amount:      { min: "0.50", max: "500" }
"#;

#[test]
fn any_declared_param_can_be_constrained() {
    let m = manifest_from(LLM);
    let chat = |body: &str| decide(&m, "llm", Method::POST, "/chat", &[], Some(body));
    assert_eq!(chat(r#"{"model": "gpt-4o-mini"}"#).verdict, Verdict::Allow);
    assert_eq!(chat(r#"{"model": " GPT-4o-Mini "}"#).verdict, Verdict::Allow);
    assert_eq!(chat(r#"{"model": "gpt-4o-2024-08-06"}"#).verdict, Verdict::Allow);
    assert_eq!(chat(r#"{"model": "gpt-4o-2024-05-13"}"#).code(), "param_not_allowed");
    assert_eq!(chat(r#"{"model": "o1-pro"}"#).code(), "param_not_allowed");
    assert_eq!(chat(r#"{"messages": []}"#).code(), "param_not_allowed");
    assert_eq!(chat(r#"{"model": null}"#).code(), "param_not_allowed");
    assert_eq!(chat(r#"{"model": ["gpt-4o-mini"]}"#).code(), "param_not_allowed");
    assert_eq!(chat(r#"{"model": "gpt-4o-mini", "model": "o1-pro"}"#).code(), "param_ambiguous");
    // A route that does not declare the param is not constrained by it.
    assert_eq!(decide(&m, "llm", Method::GET, "/models", &[], None).verdict, Verdict::Allow);
    // Ranges compare decimals, inclusive; a value that is no number is out of range.
    let tune = |t: &str| {
        decide(
            &m,
            "llm",
            Method::POST,
            "/tune",
            &[],
            Some(&format!(r#"{{"model": "gpt-4o-mini", "temperature": {t}}}"#)),
        )
    };
    assert_eq!(tune("1.5").verdict, Verdict::Allow);
    assert_eq!(tune("0").verdict, Verdict::Allow);
    assert_eq!(tune("\"0.7\"").verdict, Verdict::Allow);
    assert_eq!(tune("1.5000001").code(), "param_out_of_range");
    assert_eq!(tune("-0.1").code(), "param_out_of_range");
    assert_eq!(tune("\"hot\"").code(), "param_out_of_range");
    assert_eq!(tune("1e1").code(), "param_out_of_range"); // 10.0
    assert_eq!(tune("1e0").verdict, Verdict::Allow);
    assert_eq!(
        decide(&m, "llm", Method::POST, "/tune", &[], Some(r#"{"model": "gpt-4o-mini"}"#)).code(),
        "param_not_allowed"
    );
    // The amount constraint sees the amount as read (form body, fixed currency).
    let refund = |a: &str| decide(&m, "llm", Method::POST, "/refund", &[], Some(a));
    assert_eq!(refund("amount=0.50").verdict, Verdict::Allow);
    assert_eq!(refund("amount=500").verdict, Verdict::Allow);
    assert_eq!(refund("amount=0.49").code(), "param_out_of_range");
    assert_eq!(refund("amount=500.01").code(), "param_out_of_range");
}

#[test]
fn tokens_narrow_params_with_their_own_codes() {
    let m = manifest_from(LLM);
    let mut c = claims();
    c.constraints = Some(crate::identity::Constraints {
        params: Some(
            [
                (
                    "model".to_string(),
                    crate::identity::ParamConstraint { allow: vec!["gpt-4o-mini".into()], ..Default::default() },
                ),
                (
                    "amount".to_string(),
                    crate::identity::ParamConstraint { max: Some("20".parse().unwrap()), ..Default::default() },
                ),
            ]
            .into(),
        ),
        ..Default::default()
    });
    let as_token = |path: &str, body: &str| decide_as(&m, Some(&c), "llm", Method::POST, path, &[], Some(body));
    assert_eq!(as_token("/chat", r#"{"model": "GPT-4O-MINI"}"#).verdict, Verdict::Allow);
    // Allowed by the manifest, not by the token.
    assert_eq!(as_token("/chat", r#"{"model": "gpt-4o-2024-08-06"}"#).code(), "token_param_not_allowed");
    // The manifest decides first.
    assert_eq!(as_token("/chat", r#"{"model": "o1-pro"}"#).code(), "param_not_allowed");
    assert_eq!(as_token("/refund", "amount=20").verdict, Verdict::Allow);
    assert_eq!(as_token("/refund", "amount=20.01").code(), "token_param_out_of_range");
}

/// Nested JSON objects along `path`, a string `leaf` at the end, siblings at every level, and
/// (when `dup` is set) a second member with the path's key at that depth.
fn nested(path: &[String], leaf: &str, siblings: &[String], dup: Option<(usize, bool)>, depth: usize) -> String {
    let inner = if depth == path.len() - 1 {
        serde_json::to_string(leaf).unwrap()
    } else {
        nested(path, leaf, siblings, dup, depth + 1)
    };
    let mut members: Vec<String> = siblings.iter().map(|s| format!(r#""s_{s}":{{"k":1}}"#)).collect();
    let key = serde_json::to_string(&path[depth]).unwrap();
    members.push(format!("{key}:{inner}"));
    if let Some((at, before)) = dup
        && at == depth
    {
        let other = format!(r#"{key}:"other""#);
        if before { members.insert(0, other) } else { members.push(other) }
    }
    format!("{{{}}}", members.join(","))
}

proptest! {
    #[test]
    fn duplicate_keys_on_a_pointer_path_are_always_ambiguous(
        path in proptest::collection::vec("[a-z]{1,6}", 1..6),
        siblings in proptest::collection::vec("[a-z]{1,4}", 0..3),
        leaf in "[a-z0-9_]{1,10}",
        at in 0usize..6,
        before in any::<bool>(),
    ) {
        let at = at % path.len();
        let ptr: String = path.iter().map(|k| format!("/{k}")).collect();
        let m = manifest_from(&format!(
            "apiVersion: uapk/v1\nkind: Manifest\nagent: {{ id: unit-agent }}\ncapability: {{ required: false }}\n\
             connectors:\n  - name: api\n    base_url: https://api.example.com\n    routes:\n      \
             - {{ methods: [POST], path: /x, action: x.do, params: {{ target: {{ json: \"{ptr}\" }} }} }}\n"
        ));
        let clean = nested(&path, &leaf, &siblings, None, 0);
        let d = decide(&m, "api", Method::POST, "/x", &[], Some(&clean));
        prop_assert_eq!(d.verdict, Verdict::Allow, "{}", clean);
        let c = m.connector("api").unwrap();
        let p = extract_params(&c.routes[0], &[], &HeaderMap::new(), None, Some(clean.as_bytes()));
        prop_assert_eq!(p.get("target"), Some(leaf.as_str()));
        let dup = nested(&path, &leaf, &siblings, Some((at, before)), 0);
        let d = decide(&m, "api", Method::POST, "/x", &[], Some(&dup));
        prop_assert_eq!(d.code(), "param_ambiguous", "{}", dup);
        // serde_json would have picked one of the two silently.
        prop_assert!(serde_json::from_str::<serde_json::Value>(&dup).is_ok());
    }
}
