//! End to end: every §8 reason code from a real request through a real gateway to a real
//! upstream, with the §7 status and body and a matching entry in the audit log.

mod common;

use common::*;
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
    status: u16,
    code: &'static str,
}

async fn send(gw: &TestGateway, c: &Case) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut rb = client().request(c.method.parse().unwrap(), gw.base(c.path));
    for (k, v) in &c.headers {
        rb = rb.header(*k, v);
    }
    if let Some(b) = &c.body {
        rb = rb.json(b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

fn cap(agent: &str) -> (&'static str, String) {
    ("x-uapk-capability", token(agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_code_has_its_status_body_and_record() {
    let up = Upstream::start().await;
    let m = manifest("pay-agent", up.addr, POLICY, "");
    // A second agent whose token narrows the manifest.
    let gw = TestGateway::start(&[("pay.yaml", m)], "").await;

    let mut narrow = claims("pay-agent");
    narrow.connectors = Some(vec!["other".into()]);
    let token_no_shop = mint(&narrow);
    let mut narrow = claims("pay-agent");
    narrow.action_types = Some(vec!["payment.read".into()]);
    let token_read_only = mint(&narrow);
    let mut narrow = claims("pay-agent");
    narrow.constraints = Some(uapk_gateway::identity::Constraints {
        amount_max: [("USD".to_string(), "10.00".parse().unwrap())].into(),
        jurisdictions: Some(vec!["US".into()]),
        counterparties: Some(uapk_gateway::identity::CounterpartyConstraint {
            allow: vec!["cus_ok".into()],
            deny: vec![],
        }),
        params: None,
    });
    let token_constrained = mint(&narrow);
    let mut revoked = claims("pay-agent");
    revoked.jti = Some("revoked-jti".into());
    let mut expired = claims("pay-agent");
    expired.iat = now() - 7200;
    expired.exp = now() - 3600;

    let refund =
        |amount: Value, cur: &str, customer: &str| json!({"amount": amount, "currency": cur, "customer": customer});
    let us = || ("x-country", "US".to_string());
    let cases = vec![
        Case {
            name: "no token",
            method: "GET",
            path: "/shop/v1/charges/ch_1",
            body: None,
            headers: vec![],
            status: 403,
            code: "capability_token_required",
        },
        Case {
            name: "garbage token",
            method: "GET",
            path: "/shop/v1/charges/ch_1",
            body: None,
            headers: vec![("x-uapk-capability", "abc.def.ghi".into())],
            status: 403,
            code: "capability_token_invalid",
        },
        Case {
            name: "expired token",
            method: "GET",
            path: "/shop/v1/charges/ch_1",
            body: None,
            headers: vec![("x-uapk-capability", mint(&expired))],
            status: 403,
            code: "capability_token_expired",
        },
        Case {
            name: "revoked token",
            method: "GET",
            path: "/shop/v1/charges/ch_1",
            body: None,
            headers: vec![("x-uapk-capability", mint(&revoked))],
            status: 403,
            code: "capability_token_revoked",
        },
        Case {
            name: "unknown agent",
            method: "GET",
            path: "/shop/v1/charges/ch_1",
            body: None,
            headers: vec![cap("ghost-agent")],
            status: 403,
            code: "manifest_not_found",
        },
        Case {
            name: "connector not defined",
            method: "GET",
            path: "/bank/v1/x",
            body: None,
            headers: vec![cap("pay-agent")],
            status: 403,
            code: "tool_not_allowed",
        },
        Case {
            name: "connector denied",
            method: "GET",
            path: "/other/anything",
            body: None,
            headers: vec![cap("pay-agent")],
            status: 403,
            code: "tool_not_allowed",
        },
        Case {
            name: "token connectors",
            method: "GET",
            path: "/shop/v1/charges/ch_1",
            body: None,
            headers: vec![("x-uapk-capability", token_no_shop)],
            status: 403,
            code: "token_tool_not_allowed",
        },
        Case {
            name: "no route",
            method: "GET",
            path: "/shop/v1/customers",
            body: None,
            headers: vec![cap("pay-agent")],
            status: 403,
            code: "route_not_allowed",
        },
        Case {
            name: "action denied",
            method: "DELETE",
            path: "/shop/v1/charges/ch_1",
            body: None,
            headers: vec![cap("pay-agent")],
            status: 403,
            code: "action_type_not_allowed",
        },
        Case {
            name: "token actions",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(100), "USD", "cus_1")),
            headers: vec![("x-uapk-capability", token_read_only), us()],
            status: 403,
            code: "token_action_type_not_allowed",
        },
        Case {
            name: "amount invalid",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!("abc"), "USD", "cus_1")),
            headers: vec![cap("pay-agent"), us()],
            status: 403,
            code: "amount_invalid",
        },
        Case {
            name: "approval",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(6000), "USD", "cus_1")),
            headers: vec![cap("pay-agent"), us()],
            status: 403,
            code: "amount_requires_approval",
        },
        Case {
            name: "cap",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(9500), "EUR", "cus_1")),
            headers: vec![cap("pay-agent"), us()],
            status: 403,
            code: "amount_exceeds_cap",
        },
        Case {
            name: "currency",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(100), "JPY", "cus_1")),
            headers: vec![cap("pay-agent"), us()],
            status: 403,
            code: "currency_not_allowed",
        },
        Case {
            name: "token cap",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(2000), "USD", "cus_ok")),
            headers: vec![("x-uapk-capability", token_constrained.clone()), us()],
            status: 403,
            code: "token_amount_exceeds_cap",
        },
        Case {
            name: "jurisdiction",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(100), "USD", "cus_1")),
            headers: vec![cap("pay-agent"), ("x-country", "FR".into())],
            status: 403,
            code: "jurisdiction_not_allowed",
        },
        Case {
            name: "jurisdiction missing",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(100), "USD", "cus_1")),
            headers: vec![cap("pay-agent")],
            status: 403,
            code: "jurisdiction_not_allowed",
        },
        Case {
            name: "token jurisdiction",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(100), "USD", "cus_ok")),
            headers: vec![("x-uapk-capability", token_constrained.clone()), ("x-country", "CA".into())],
            status: 403,
            code: "token_jurisdiction_not_allowed",
        },
        Case {
            name: "counterparty",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(100), "USD", "cus_blocked")),
            headers: vec![cap("pay-agent"), us()],
            status: 403,
            code: "counterparty_denied",
        },
        Case {
            name: "token counterparty",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(100), "USD", "cus_other")),
            headers: vec![("x-uapk-capability", token_constrained), us()],
            status: 403,
            code: "token_counterparty_not_allowed",
        },
        Case {
            name: "allowed",
            method: "POST",
            path: "/shop/v1/refunds",
            body: Some(refund(json!(1234), "usd", "cus_1")),
            headers: vec![cap("pay-agent"), us()],
            status: 200,
            code: "all_checks_passed",
        },
    ];
    for c in &cases {
        let before = up.count();
        let (status, body, headers) = send(&gw, c).await;
        assert_eq!(status, c.status, "{}: body {body}", c.name);
        let record: u64 = headers
            .get("x-uapk-record")
            .unwrap_or_else(|| panic!("{}: no x-uapk-record", c.name))
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        if c.status == 200 {
            assert_eq!(up.count(), before + 1, "{}: the upstream should see it", c.name);
        } else {
            assert_eq!(up.count(), before, "{}: the upstream must not see a refused request", c.name);
            assert_eq!(body["reasons"][0]["code"], c.code, "{}: {body}", c.name);
            assert_eq!(body["record"], json!(record), "{}", c.name);
            let want = if c.code == "amount_requires_approval" { "escalate" } else { "deny" };
            assert_eq!(body["decision"], want, "{}", c.name);
            assert_eq!(headers["x-uapk-decision"], want, "{}", c.name);
        }
        let entry = gw.entries().into_iter().find(|e| e["idx"] == json!(record.to_string())).expect("record exists");
        assert_eq!(entry["kind"], "decision", "{}", c.name);
        assert_eq!(entry["reasons"][0]["code"], c.code, "{}: {entry}", c.name);
        assert_eq!(entry["method"], c.method, "{}", c.name);
    }
    // The allowed refund was normalised: 1234 minor units → 12.34, currency upper-case.
    let allowed = decisions(&gw.entries()).into_iter().rev().find(|e| e["decision"] == "allow").unwrap();
    assert_eq!(allowed["params"]["amount"], "12.34");
    assert_eq!(allowed["params"]["currency"], "USD");
    // The escalation stored a pending approval whose id the client got.
    let escalated = decisions(&gw.entries()).into_iter().find(|e| e["decision"] == "escalate").unwrap();
    let id = escalated["approval_id"].as_str().unwrap();
    assert!(id.starts_with("appr-") && id.len() == 29, "{id}");
    let stored = gw.gateway().approvals.get(id).unwrap().unwrap();
    assert_eq!(stored.status, uapk_gateway::approvals::Status::Pending);
    assert_eq!(stored.params["amount"], "60");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_never_slip_through() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let tok = token("pay-agent");
    let raw_bodies = [
        r#"{"amount":"abc","currency":"USD","customer":"c"}"#,
        r#"{"amount":"NaN","currency":"USD","customer":"c"}"#,
        r#"{"amount":-5,"currency":"USD","customer":"c"}"#,
        r#"{"amount":"-5","currency":"USD","customer":"c"}"#,
        r#"{"amount":1e400,"currency":"USD","customer":"c"}"#,
        r#"{"amount":12.5,"currency":"USD","customer":"c"}"#,
        r#"{"amount":null,"currency":"USD","customer":"c"}"#,
        r#"{"amount":[1],"currency":"USD","customer":"c"}"#,
        r#"{"currency":"USD","customer":"c"}"#,
        r#"not json"#,
    ];
    for b in raw_bodies {
        let r = client()
            .post(gw.base("/shop/v1/refunds"))
            .header("x-uapk-capability", &tok)
            .header("x-country", "US")
            .header("content-type", "application/json")
            .body(b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{b}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["reasons"][0]["code"], "amount_invalid", "{b}: {v}");
    }
    assert_eq!(up.count(), 0);
    // Caps are per currency and the currency is normalised.
    let send = |amount: u64, cur: &'static str| {
        let tok = tok.clone();
        let url = gw.base("/shop/v1/refunds");
        async move {
            let r = client()
                .post(url)
                .header("x-uapk-capability", tok)
                .header("x-country", "US")
                .json(&json!({"amount": amount, "currency": cur, "customer": "c"}))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (s, v["reasons"][0]["code"].as_str().unwrap_or("").to_string())
        }
    };
    assert_eq!(send(4000, "eur").await.0, 200); // 40.00 EUR, below the 45? no threshold for EUR here
    assert_eq!(send(9001, "eur").await.1, "amount_exceeds_cap"); // 90.01 > 90.00
    assert_eq!(send(9000, "EUR").await.0, 200); // exactly the cap
    assert_eq!(send(10001, "usd").await.1, "amount_exceeds_cap");
    assert_eq!(send(5001, "USD").await.1, "amount_requires_approval");
    assert_eq!(up.count(), 2);
}
