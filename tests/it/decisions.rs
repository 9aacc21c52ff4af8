//! End to end: every §8 reason code from a real request through a real gateway to a real
//! upstream, with the §7 status and body and a matching entry in the audit log.

use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;

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
        let entry = gw.entry(record);
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
    let stored = gw.approval(id).await;
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
            (s, reason(&v).to_string())
        }
    };
    assert_eq!(send(4000, "eur").await.0, 200); // 40.00 EUR, below the 45? no threshold for EUR here
    assert_eq!(send(9001, "eur").await.1, "amount_exceeds_cap"); // 90.01 > 90.00
    assert_eq!(send(9000, "EUR").await.0, 200); // exactly the cap
    assert_eq!(send(10001, "usd").await.1, "amount_exceeds_cap");
    assert_eq!(send(5001, "USD").await.1, "amount_requires_approval");
    assert_eq!(up.count(), 2);
}

/// The used count of an agent-scoped daily budget, as the running gateway holds it.
fn used_today(gw: &TestGateway, agent: &str) -> u64 {
    use uapk_gateway::config::{Scope, Window};
    gw.memory_budgets().used(agent, Window::Day, Scope::Agent, agent, now())
}

fn budget_replayed(gw: &TestGateway) -> Value {
    gw.entries().iter().rev().find(|e| e["kind"] == "startup").expect("startup entry")["budget_actions_replayed"]
        .clone()
}

/// A client whose HTTPS goes through the gateway's CONNECT (a fresh client: a fresh tunnel).
fn tunnel_client(gw: &TestGateway, tok: &str, root_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(format!("http://agent:{tok}@{}", gw.proxy)).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(root_pem).unwrap())
        .build()
        .unwrap()
}

async fn get(c: &reqwest::Client, url: String) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, reason(&v).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_count_the_same_decisions_before_and_after_a_restart() {
    let up = TlsUpstream::start().await;
    let port = up.addr.port();
    let m = tls_manifest(port, "policy:\n  budgets:\n    - window: day\n      scope: agent\n      max_actions: 3\n");
    let files = [("tls.yaml", m)];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &up.ca_pem).unwrap();
    let tls = format!("tls:\n  extra_upstream_roots: [{}]\n", dir.path().join("upstream-ca.pem").display());
    std::fs::write(dir.path().join("gateway.yaml"), gateway_yaml(dir.path(), "127.0.0.1:0", "127.0.0.1:0", &tls))
        .unwrap();
    let gw = TestGateway::start_in(dir, &files, "").await;
    let idle = gw.holders();
    let tok = token("tls-agent");
    let gateway_ca = std::fs::read(gw.data().join("ca.pem")).unwrap();
    let item = |n: u32| format!("https://localhost:{port}/v1/items/{n}");

    // Two actions inside one intercepted tunnel: one CONNECT, two decisions that count.
    let c = tunnel_client(&gw, &tok, &gateway_ca);
    assert_eq!(get(&c, item(1)).await.0, 200);
    assert_eq!(get(&c, item(2)).await.0, 200);
    // A passthrough tunnel: authorised and forwarded, but not an action.
    let pinned = tunnel_client(&gw, &tok, up.ca_pem.as_bytes());
    assert_eq!(get(&pinned, format!("https://127.0.0.1:{port}/v1/items/3")).await.0, 200);
    // A third action in a second tunnel: the budget is now spent.
    assert_eq!(get(&tunnel_client(&gw, &tok, &gateway_ca), item(4)).await.0, 200);
    assert_eq!(used_today(&gw, "tls-agent"), 3);
    let fourth = get(&tunnel_client(&gw, &tok, &gateway_ca), item(5)).await;
    assert_eq!(fourth, (403, "budget_exceeded".to_string()));
    assert_eq!(up.count(), 4, "three actions and one passthrough request reached the upstream");
    let d = decisions(&gw.entries());
    let tunnels = d.iter().filter(|e| e["method"] == "CONNECT" && e["decision"] == "allow").count();
    assert!(tunnels >= 4, "every tunnel authorisation is recorded as an allow ({tunnels})");
    assert_eq!(d.iter().filter(|e| e["decision"] == "allow" && e["route"].is_string()).count(), 3);

    // Restart on the same data directory: the count rebuilt from the log is the runtime's.
    // (Open tunnels hold the gateway, and so its database: close them first.)
    drop((c, pinned));
    eventually("the tunnels to close", Duration::from_secs(10), async || (gw.holders() <= idle).then_some(())).await;
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &files, "").await;
    assert_eq!(budget_replayed(&gw), "3");
    assert_eq!(used_today(&gw, "tls-agent"), 3);
    let fourth = get(&tunnel_client(&gw, &tok, &gateway_ca), item(6)).await;
    assert_eq!(fourth, (403, "budget_exceeded".to_string()));
    assert_eq!(up.count(), 4);
    // Tunnels are still authorised (they never counted), and still count nothing.
    assert_eq!(
        get(&tunnel_client(&gw, &tok, up.ca_pem.as_bytes()), format!("https://127.0.0.1:{port}/v1/items/7")).await.0,
        200
    );
    assert_eq!(used_today(&gw, "tls-agent"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_ssrf_guard_refuses_spends_no_budget_and_no_rate_quota() {
    let up = Upstream::start().await;
    let m = meter_manifest(
        up.addr,
        "  budgets:\n    - window: day\n      scope: agent\n      max_actions: 2\n  rate_limits:\n    - scope: agent\n      rate: 1/h\n      burst: 1\n",
    );
    let files = [("meter.yaml", m)];
    let gw = TestGateway::start(&files, "identity:\n  default_agent: meter-agent\n").await;
    let c = client();
    // Allowed by the policy, then refused by the SSRF guard: before, each took the agent's one
    // unit of rate quota.
    for i in 0..3 {
        let r = c.get(gw.base(&format!("/meta/latest/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 403);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["reasons"][0]["code"], "ssrf_blocked", "{v}");
    }
    assert_eq!(used_today(&gw, "meter-agent"), 0);
    assert_eq!(get(&c, gw.base("/shop/v1/a")).await, (200, String::new()));
    // Rate-limited: 429, and the budget slot it reserved is handed back.
    let r = c.get(gw.base("/shop/v1/b")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(used_today(&gw, "meter-agent"), 1);
    assert_eq!(up.count(), 1);
    // The same count after a restart; the last slot is then taken once, and once only.
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &files, "").await;
    assert_eq!(budget_replayed(&gw), "1");
    assert_eq!(used_today(&gw, "meter-agent"), 1);
    assert_eq!(get(&c, gw.base("/shop/v1/c")).await, (200, String::new()));
    assert_eq!(get(&c, gw.base("/shop/v1/d")).await, (403, "budget_exceeded".to_string()));
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_escalations_are_forwarded_but_counted_by_no_budget() {
    let up = Upstream::start().await;
    let policy = format!("{POLICY}  budgets:\n    - window: day\n      max_actions: 5\n");
    let files = [("pay.yaml", manifest("pay-agent", up.addr, &policy, "mode: dry_run\n"))];
    let gw = TestGateway::start(&files, "").await;
    let tok = token("pay-agent");
    // 60.00 USD is above the approval threshold: ESCALATE, forwarded anyway in dry run.
    let r = gw.refund(&tok, 6000, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-uapk-would-deny"], "amount_requires_approval");
    assert_eq!(gw.refund(&tok, 1000, None).await.status(), 200);
    assert_eq!(up.count(), 2);
    let d = decisions(&gw.entries());
    assert_eq!(d.iter().filter(|e| e["decision"] == "escalate").count(), 1);
    assert_eq!(used_today(&gw, "pay-agent"), 1, "only the ALLOW counts");
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &files, "").await;
    assert_eq!(budget_replayed(&gw), "1");
    assert_eq!(used_today(&gw, "pay-agent"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_added_by_a_reload_sees_what_a_restart_would() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let tok = token("pay-agent");
    for _ in 0..2 {
        assert_eq!(gw.refund(&tok, 1000, None).await.status(), 200);
    }
    // The agent had no budget; a reload gives it one of 3 a day. Two are already spent, as a
    // rebuild from the log would also find.
    let policy = format!("{POLICY}  budgets:\n    - window: day\n      max_actions: 3\n");
    std::fs::write(gw.dir.path().join("policies/pay.yaml"), manifest("pay-agent", up.addr, &policy, "")).unwrap();
    eventually("the reload to be applied", Duration::from_secs(10), async || {
        (gw.entries().iter().filter(|e| e["kind"] == "config").count() >= 2).then_some(())
    })
    .await;
    assert_eq!(used_today(&gw, "pay-agent"), 2);
    assert_eq!(gw.refund(&tok, 1000, None).await.status(), 200);
    let r = gw.refund(&tok, 1000, None).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "budget_exceeded");
    assert_eq!(up.count(), 3);
}

/// `capability.leeway`: the clock skew a manifest allows on `exp`. The default (60 s) accepts a
/// token 18 s past `exp`; `0s` refuses one 1 s past it, with its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_leeway_decides_how_late_a_token_may_be() {
    let up = Upstream::start().await;
    let strict = manifest("strict-agent", up.addr, "", "")
        .replace("  max_lifetime: 24h\n", "  max_lifetime: 24h\n  leeway: 0s\n");
    assert!(strict.contains("leeway: 0s"));
    let lax = manifest("lax-agent", up.addr, "", "");
    let gw = TestGateway::start(&[("strict.yaml", strict), ("lax.yaml", lax)], "").await;
    let late = |agent: &str, secs: i64| {
        let mut c = claims(agent);
        c.iat = now() - 600;
        c.exp = now() - secs;
        mint(&c)
    };
    let get = |t: String| client().get(gw.base("/shop/v1/charges/ch_1")).header("x-uapk-capability", t).send();

    let r = get(late("lax-agent", 18)).await.unwrap();
    assert_eq!(r.status(), 200, "the default leeway accepts a token 18 s past exp");
    let r = get(late("strict-agent", 1)).await.unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reasons"][0]["code"], "capability_token_expired", "{body}");
    let entry = gw.entry(body["record"].as_u64().unwrap());
    assert_eq!(entry["decision"], "deny");
    assert_eq!(entry["reasons"][0]["code"], "capability_token_expired", "{entry}");
    // A fresh token for the strict agent is served.
    let r = client().get(gw.base("/shop/v1/charges/ch_1")).header("x-uapk-capability", token("strict-agent")).send();
    assert_eq!(r.await.unwrap().status(), 200);
}
