//! Operating the gateway: approvals (reject and hold), rate limits, the admin API, hot reload
//! with the Kubernetes ConfigMap layout, dry run, metrics, and graceful shutdown of the real
//! binary under load.

use crate::support::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const APPROVER: &str = "uapk_test_approver";
const VIEWER: &str = "uapk_test_viewer";

fn admin_keys() -> String {
    crate::support::admin_keys(&[("ops", APPROVER, "approver"), ("audit", VIEWER, "viewer")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_round_trip_and_every_refusal() {
    let up = Upstream::start().await;
    let files = [
        ("pay.yaml", manifest("pay-agent", up.addr, POLICY, "escalation:\n  approval_ttl: 2s\n")),
        ("other.yaml", manifest("other-agent", up.addr, POLICY, "")),
    ];
    let gw = TestGateway::start(&files, &admin_keys()).await;
    let tok = token("pay-agent");
    let r = gw.refund(&tok, 6000, None).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["decision"], "escalate");
    let id = v["approval_id"].as_str().unwrap().to_string();
    // A viewer may look but not approve.
    let r = client().get(gw.admin_url("/v1/approvals?status=pending")).bearer_auth(VIEWER).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["approvals"][0]["id"], id.as_str());
    assert_eq!(list["approvals"][0]["params"]["amount"], "60");
    assert_eq!(gw.approve(&id, VIEWER).await.0, 403);
    assert_eq!(gw.approve(&id, "not-a-key").await.0, 401);
    let (status, body) = gw.approve(&id, APPROVER).await;
    assert_eq!(status, 200, "{body}");
    let over = body["override_token"].as_str().unwrap().to_string();
    assert_eq!(gw.approve(&id, APPROVER).await.0, 409, "no approving twice");
    // Another agent cannot use it; a changed body cannot either.
    let r = gw.refund(&token("other-agent"), 6000, Some(&over)).await;
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "override_token_invalid");
    let r = gw.refund(&tok, 6001, Some(&over)).await;
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "override_token_invalid");
    assert_eq!(up.count(), 0);
    // The identical request goes through exactly once.
    let r = gw.refund(&tok, 6000, Some(&over)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 1);
    let r = gw.refund(&tok, 6000, Some(&over)).await;
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "override_token_already_used");
    assert_eq!(up.count(), 1);
    // A denied approval gives no token; an expired one cannot be approved.
    let v: Value = gw.refund(&tok, 7000, None).await.json().await.unwrap();
    let denied = v["approval_id"].as_str().unwrap().to_string();
    let r = client()
        .post(gw.admin_url(&format!("/v1/approvals/{denied}/deny")))
        .bearer_auth(APPROVER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await.unwrap().get("override_token").is_none());
    assert_eq!(gw.approve(&denied, APPROVER).await.0, 409);
    let v: Value = gw.refund(&tok, 8000, None).await.json().await.unwrap();
    let late = v["approval_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(gw.approve(&late, APPROVER).await.0, 409, "no approving after expiry");
    let events: Vec<String> = gw
        .entries()
        .iter()
        .filter(|e| e["kind"] == "approval")
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    for want in ["created", "approved", "consumed", "denied"] {
        assert!(events.iter().any(|e| e == want), "{want} missing from {events:?}");
    }
}

/// Ids of pending approvals, once there is at least one (2 s at most).
async fn wait_pending(gw: &TestGateway) -> Vec<String> {
    eventually("a pending approval", Duration::from_secs(2), async || {
        let v: Value = client()
            .get(gw.admin_url("/v1/approvals?status=pending"))
            .bearer_auth(VIEWER)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<String> =
            v["approvals"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap().to_string()).collect();
        (!ids.is_empty()).then_some(ids)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_mode_waits_for_the_human() {
    let up = Upstream::start().await;
    let files = [(
        "pay.yaml",
        manifest("pay-agent", up.addr, POLICY, "escalation:\n  mode: hold\n  hold_timeout: 2s\n  max_pending: 250\n"),
    )];
    let gw = TestGateway::start(&files, &admin_keys()).await;
    let tok = token("pay-agent");
    // Approved while held: the request completes with the upstream's answer, once.
    let (url, t2) = (gw.base("/shop/v1/refunds"), tok.clone());
    let held = tokio::spawn(async move { refund_at(&url, &t2, 6000, None).await });
    let ids = wait_pending(&gw).await;
    assert_eq!(up.count(), 0, "nothing forwarded while held");
    assert_eq!(gw.approve(&ids[0], APPROVER).await.0, 200);
    let r = held.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 1);
    // Denied while held.
    let (url, t2) = (gw.base("/shop/v1/refunds"), tok.clone());
    let held = tokio::spawn(async move { refund_at(&url, &t2, 6100, None).await });
    let ids = wait_pending(&gw).await;
    let r = client()
        .post(gw.admin_url(&format!("/v1/approvals/{}/deny", ids[0])))
        .bearer_auth(APPROVER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = held.await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "approval_denied");
    // Many held requests at once time out together (parked futures, not threads).
    let started = Instant::now();
    let waits: Vec<_> = (0..200)
        .map(|i| {
            let (url, t2) = (gw.base("/shop/v1/refunds"), tok.clone());
            tokio::spawn(async move {
                let r = refund_at(&url, &t2, 5100 + i, None).await;
                let s = r.status().as_u16();
                (s, reason(&r.json::<Value>().await.unwrap()).to_string())
            })
        })
        .collect();
    for w in waits {
        assert_eq!(w.await.unwrap(), (403, "approval_timeout".to_string()));
    }
    assert!(started.elapsed() < Duration::from_secs(10), "200 holds took {:?}", started.elapsed());
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_and_refusals_spend_no_quota() {
    let up = Upstream::start().await;
    let policy = "  rate_limits:\n    - scope: agent\n      rate: 10/s\n      burst: 5\n";
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, policy, ""))], &admin_keys()).await;
    let tok = token("pay-agent");
    let get = |path: &str| client().get(gw.base(path)).header("x-uapk-capability", &tok).send();
    // Refused requests first: they must not drain the bucket.
    for _ in 0..20 {
        assert_eq!(get("/shop/v1/nope").await.unwrap().status(), 403);
    }
    let mut ok = 0;
    let mut limited = None;
    let started = Instant::now();
    for _ in 0..30 {
        let r = get("/shop/v1/charges/a").await.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => limited = Some(r),
            s => panic!("unexpected {s}"),
        }
    }
    // The burst, plus what 10/s refills while the loop runs (a slow machine runs it slower).
    let refill = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(ok >= 5 && ok <= 5 + refill + 1, "{ok} allowed for a burst of 5 at 10/s over {:?}", started.elapsed());
    let r = limited.expect("some requests are limited");
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(r.headers()["ratelimit-policy"].to_str().unwrap().contains("q=10;w=1"));
    assert!(r.headers().contains_key("ratelimit"));
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "rate_limited");
    let m = gw.metrics().await;
    assert!(m.contains("uapk_ratelimit_keys 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_keys_and_serves_records() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, "", ""))], &admin_keys()).await;
    gw.get("/shop/v1/charges/a", &token("pay-agent")).await;
    for path in ["/v1/approvals", "/v1/records", "/v1/checkpoint", "/v1/manifests"] {
        assert_eq!(client().get(gw.admin_url(path)).send().await.unwrap().status(), 401, "{path}");
        assert_eq!(client().get(gw.admin_url(path)).bearer_auth("wrong").send().await.unwrap().status(), 401, "{path}");
        assert_eq!(client().get(gw.admin_url(path)).bearer_auth(VIEWER).send().await.unwrap().status(), 200, "{path}");
    }
    let recs: Value = client()
        .get(gw.admin_url("/v1/records?from=0&limit=10"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(recs["records"][0]["kind"], "startup");
    let one =
        client().get(gw.admin_url("/v1/records/0")).bearer_auth(VIEWER).send().await.unwrap().text().await.unwrap();
    assert!(one.starts_with('{') && one.contains("\"kind\":\"startup\""), "{one}");
    let cp =
        client().get(gw.admin_url("/v1/checkpoint")).bearer_auth(VIEWER).send().await.unwrap().text().await.unwrap();
    assert!(cp.starts_with("test.example/log\n"), "{cp}");
    let m: Value =
        client().get(gw.admin_url("/v1/manifests")).bearer_auth(VIEWER).send().await.unwrap().json().await.unwrap();
    assert_eq!(m["manifests"][0]["agent"], "pay-agent");
    assert_eq!(m["manifests"][0]["sha256"].as_str().unwrap().len(), 64);
}

/// Writes `text` as the manifest of a ConfigMap-style directory, swapping `..data` atomically.
fn configmap_swap(dir: &std::path::Path, generation: u32, text: &str) {
    kubelet_swap(dir, generation, "pay.yaml", text);
}

/// Updates a mounted ConfigMap or Secret as the kubelet does: the new generation's files in a
/// hidden directory, then one rename of the `..data` symlink; `name` links into `..data`.
fn kubelet_swap(dir: &std::path::Path, generation: u32, name: &str, text: &str) {
    let real = dir.join(format!("..gen_{generation}"));
    std::fs::create_dir_all(&real).unwrap();
    std::fs::write(real.join(name), text).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..gen_{generation}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join(name).exists() {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
}

/// `GET /shop/v1/charges/a` as `agent` (its capability token on the base-URL listener).
async fn charges_as(gw: &TestGateway, agent: &str) -> reqwest::Response {
    gw.get("/shop/v1/charges/a", &token(agent)).await
}

/// Polls until the allowed route answers `want`; returns how long that took.
async fn wait_for(gw: &TestGateway, want: u16) -> Duration {
    wait_for_agent(gw, "pay-agent", want).await
}

/// Polls until `agent`'s allowed route answers `want` (3 s at most); returns how long it took.
async fn wait_for_agent(gw: &TestGateway, agent: &str, want: u16) -> Duration {
    let t = Instant::now();
    eventually(format!("the decision to change to {want}"), Duration::from_secs(3), async || {
        (charges_as(gw, agent).await.status().as_u16() == want).then_some(())
    })
    .await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_reloads_apply_and_bad_ones_are_refused() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    configmap_swap(&policies, 1, &manifest("pay-agent", up.addr, "", ""));
    let gw = TestGateway::start_in(dir, &[], "").await;
    let tok = token("pay-agent");
    let status = || async { gw.get("/shop/v1/charges/a", &tok).await };
    assert_eq!(status().await.status(), 200);
    let policies = gw.dir.path().join("policies");
    // Swap in a manifest that denies the action: applied within about a second.
    configmap_swap(&policies, 2, &manifest("pay-agent", up.addr, "  action_types: { deny: [payment.read] }\n", ""));
    let took = wait_for(&gw, 403).await;
    assert!(took < Duration::from_millis(1500), "{took:?}");
    // An invalid manifest changes nothing, is counted and shown on /readyz.
    configmap_swap(&policies, 3, "apiVersion: uapk/v1\nkind: Manifest\nagent: { id: pay-agent }\nbogus_key: 1\n");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(status().await.status(), 403, "the last good policy keeps serving");
    let m = gw.metrics().await;
    assert!(m.contains("uapk_config_reloads_total{result=\"error\"} 1"), "{m}");
    assert!(m.contains("uapk_config_reloads_total{result=\"success\"} 1"), "{m}");
    let ready = gw.readyz().await.1;
    assert!(ready["last_reload_error"].as_str().unwrap().contains("bogus_key"), "{ready}");
    // Switching to dry_run forwards what would be denied, says so, and is recorded.
    configmap_swap(
        &policies,
        4,
        &manifest("pay-agent", up.addr, "  action_types: { deny: [payment.read] }\n", "mode: dry_run\n"),
    );
    wait_for(&gw, 200).await;
    let r = status().await;
    assert_eq!(r.headers()["x-uapk-would-deny"], "action_type_not_allowed");
    let configs: Vec<Value> = gw.entries().into_iter().filter(|e| e["kind"] == "config").collect();
    assert_eq!(configs.len(), 3, "load + two applied reloads");
    assert_eq!(configs[2]["mode_changes"][0]["to"], "dry_run");
    let d = decisions(&gw.entries());
    assert!(d.iter().any(|e| e["mode"] == "dry_run" && e["decision"] == "deny"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_spec_is_exported() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let tok = token("pay-agent");
    gw.get("/shop/v1/charges/a", &tok).await;
    gw.get("/shop/v1/nope", &tok).await;
    let m = gw.metrics().await;
    for name in [
        "uapk_requests_total{decision=\"allow\",reason=\"all_checks_passed\",agent=\"pay-agent\",connector=\"shop\",mode=\"enforce\"} 1",
        "uapk_requests_total{decision=\"deny\",reason=\"route_not_allowed\",agent=\"pay-agent\",connector=\"shop\",mode=\"enforce\"} 1",
        "uapk_request_duration_seconds_bucket",
        "uapk_upstream_duration_seconds_count 1",
        "uapk_audit_append_duration_seconds_count",
        "uapk_audit_entries_total",
        "uapk_audit_queue_depth",
        "uapk_audit_batch_size",
        "uapk_audit_commits_total",
        "uapk_audit_writable",
        "uapk_tls_leaf_cache_hits_total",
        "uapk_tls_leaf_cache_misses_total",
        "uapk_config_reloads_total",
        "uapk_approvals_pending",
        "uapk_ratelimit_keys",
        "uapk_build_info",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
    // Startup, config and the two decisions were committed in at least one group commit each.
    let value = |name: &str| -> u64 {
        m.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    let (entries, commits) = (value("uapk_audit_entries_total "), value("uapk_audit_commits_total "));
    assert!(commits >= 1 && commits <= entries, "commits {commits}, entries {entries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let up = Upstream::start().await;
    up.set_hook(|_| {
        std::thread::sleep(Duration::from_millis(800));
        (200, "{\"slow\":true}".into())
    });
    let mut gw = ChildGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, "", ""))], "", None).await;
    let tok = token("pay-agent");
    let reqs: Vec<_> = (0..10)
        .map(|_| {
            let (tok, url) = (tok.clone(), format!("http://{}/shop/v1/charges/slow", gw.proxy));
            tokio::spawn(async move {
                client().get(url).header("x-uapk-capability", tok).send().await.map(|r| r.status().as_u16())
            })
        })
        .collect();
    // Let every request reach the slow upstream, then ask the gateway to stop.
    let t = Instant::now();
    while up.seen.lock().unwrap().len() < 10 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.terminate();
    for r in reqs {
        assert_eq!(r.await.unwrap().unwrap(), 200, "an in-flight request was cut off");
    }
    // Exits 0 (checked by `stop`), with a log that verifies.
    let (entries, _) = gw.stop();
    let d = gw.dir.path();
    let (db, key) = (d.join("data/audit.redb"), d.join("data/gateway.pub.pem"));
    let (code, out, err) = run_cli(&["verify", "--db", db.to_str().unwrap(), "--key", key.to_str().unwrap()], d);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(entries.iter().filter(|e| e["kind"] == "outcome" && e["status"] == "200").count(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_is_bound_to_the_forwarded_headers() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], &admin_keys()).await;
    let tok = token("pay-agent");
    let send = |account: &'static str, trace: &'static str, over: Option<String>| {
        let mut rb = client()
            .post(gw.base("/shop/v1/refunds"))
            .header("x-uapk-capability", &tok)
            .header("x-country", "US")
            .header("stripe-account", account)
            .header("traceparent", trace)
            .header("user-agent", trace)
            .json(&json!({"amount": 6000, "currency": "USD", "customer": "cus_1"}));
        if let Some(o) = over {
            rb = rb.header("x-uapk-override", o);
        }
        rb.send()
    };
    let v: Value = send("acct_1", "00-aaaa-01", None).await.unwrap().json().await.unwrap();
    let id = v["approval_id"].as_str().unwrap().to_string();
    // The approver sees what the override will be bound to.
    let r = client().get(gw.admin_url(&format!("/v1/approvals/{id}"))).bearer_auth(VIEWER).send().await.unwrap();
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["headers"]["stripe-account"], json!(["acct_1"]), "{a}");
    assert_eq!(a["headers"]["x-country"], json!(["US"]));
    assert!(a["headers"].get("traceparent").is_none() && a["headers"].get("x-uapk-capability").is_none(), "{a}");
    assert_eq!(a["body_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(
        (a["method"].as_str(), a["scheme"].as_str(), a["path"].as_str()),
        (Some("POST"), Some("http"), Some("/v1/refunds"))
    );
    let over = gw.approve(&id, APPROVER).await.1["override_token"].as_str().unwrap().to_string();
    // Another connected account: the same body, but not the approved action.
    let r = send("acct_2", "00-aaaa-01", Some(over.clone())).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "override_token_invalid");
    assert_eq!(up.count(), 0, "a request with another header went out under the approval");
    // The approved headers, with a new trace context and user agent: forwarded once.
    let r = send("acct_1", "00-bbbb-01", Some(over)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 1);
    assert_eq!(up.last().headers.get("stripe-account").unwrap(), "acct_1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_approvals_are_bounded_per_agent_and_listed_in_pages() {
    let up = Upstream::start().await;
    let files = [
        ("pay.yaml", manifest("pay-agent", up.addr, POLICY, "escalation:\n  max_pending: 3\n")),
        ("bulk.yaml", manifest("bulk-agent", up.addr, POLICY, "escalation:\n  max_pending: 1000\n")),
    ];
    let gw = TestGateway::start(&files, &admin_keys()).await;
    let tok = token("pay-agent");
    let mut ids = Vec::new();
    for amount in [6000, 6001, 6002] {
        let v: Value = gw.refund(&tok, amount, None).await.json().await.unwrap();
        assert_eq!(v["decision"], "escalate", "{v}");
        ids.push(v["approval_id"].as_str().unwrap().to_string());
    }
    // The fourth is refused, recorded, and creates nothing.
    let r = gw.refund(&tok, 6003, None).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["decision"].as_str(), v["reasons"][0]["code"].as_str()),
        (Some("deny"), Some("too_many_pending_approvals"))
    );
    let record = v["record"].as_u64().unwrap();
    let e = gw.entry(record);
    assert_eq!(e["reasons"][0]["code"], "too_many_pending_approvals");
    assert!(v.get("approval_id").is_none());
    // Another agent is not affected by this one's backlog.
    let bulk = token("bulk-agent");
    let v: Value = gw.refund(&bulk, 6000, None).await.json().await.unwrap();
    assert_eq!(v["decision"], "escalate");
    // A decision frees a slot.
    let r = client()
        .post(gw.admin_url(&format!("/v1/approvals/{}/deny", ids[0])))
        .bearer_auth(APPROVER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = gw.refund(&tok, 6004, None).await.json().await.unwrap();
    assert_eq!(v["decision"], "escalate", "{v}");
    let metrics = gw.metrics().await;
    assert!(metrics.contains("\nuapk_approvals_pending 4\n"), "{metrics}");

    // Pages: 250 more pending, listed 100 at a time, newest first, each exactly once.
    for i in 0..250u64 {
        let v: Value = gw.refund(&bulk, 7000 + i, None).await.json().await.unwrap();
        assert_eq!(v["decision"], "escalate");
    }
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = gw.admin_url("/v1/approvals?status=pending&limit=100");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client().get(url).bearer_auth(VIEWER).send().await.unwrap().json().await.unwrap();
        let list = page["approvals"].as_array().unwrap();
        assert!(list.len() <= 100);
        let times: Vec<i64> = list.iter().map(|a| a["created_at"].as_i64().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
        for a in list {
            assert_eq!(a["status"], "pending");
            assert!(seen.insert(a["id"].as_str().unwrap().to_string()), "listed twice");
        }
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (3 + 251, 3));
    // The default page is 100; a limit above 1000 or a forged cursor is refused.
    let page: Value =
        client().get(gw.admin_url("/v1/approvals")).bearer_auth(VIEWER).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["approvals"].as_array().unwrap().len(), 100);
    for bad in ["limit=1001", "limit=0", "cursor=12-nope"] {
        let r = client().get(gw.admin_url(&format!("/v1/approvals?{bad}"))).bearer_auth(VIEWER).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fetches_its_own_approval_and_override_on_the_proxy_listener() {
    let up = Upstream::start().await;
    let files = [
        ("pay.yaml", manifest("pay-agent", up.addr, POLICY, "")),
        ("other.yaml", manifest("other-agent", up.addr, POLICY, "")),
    ];
    let gw = TestGateway::start(&files, &admin_keys()).await;
    let tok = token("pay-agent");
    let v: Value = gw.refund(&tok, 6000, None).await.json().await.unwrap();
    let id = v["approval_id"].as_str().unwrap().to_string();
    let status = |t: String, id: String| {
        let url = gw.base(&format!("/uapk/v1/approvals/{id}"));
        async move {
            let r = client().get(url).header("x-uapk-capability", t).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (code, v) = status(tok.clone(), id.clone()).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "pending");
    assert!(v.get("override_token").is_none());
    // Another agent, an unknown id, no token: 404 / 404 / 403, all recorded, nothing forwarded.
    let (code, v) = status(token("other-agent"), id.clone()).await;
    assert_eq!((code, v["reasons"][0]["code"].as_str()), (404, Some("approval_not_found")));
    let (code, _) = status(tok.clone(), "appr-000000000000000000000000".into()).await;
    assert_eq!(code, 404);
    let r = client().get(gw.base(&format!("/uapk/v1/approvals/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // Approved on the operator's side: the agent gets a token and completes the call with it.
    assert_eq!(gw.approve(&id, APPROVER).await.0, 200);
    let (code, v) = status(tok.clone(), id.clone()).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("approved")), "{v}");
    let over = v["override_token"].as_str().expect("the override token once approved").to_string();
    assert!(v["expires_at"].as_i64().unwrap() > now());
    let r = gw.refund(&tok, 6000, Some(&over)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 1);
    // Used: no more token, and the approval reads consumed.
    let (_, v) = status(tok.clone(), id.clone()).await;
    assert_eq!(v["status"], "consumed");
    assert!(v.get("override_token").is_none());
    // Every fetch is a decision record naming the approval; the issued token's jti is logged.
    let entries = gw.entries();
    let reads: Vec<&Value> = entries.iter().filter(|e| e["action"] == "uapk.approval.read").collect();
    assert_eq!(reads.len(), 5, "{reads:?}");
    // (The call without a token was refused at identification, recorded like any request.)
    assert!(entries.iter().any(|e| e["reasons"][0]["code"] == "capability_token_required"
        && e["path"].as_str().is_some_and(|p| p.starts_with("/uapk/v1/approvals/"))));
    assert!(reads.iter().filter(|e| e["decision"] == "allow").all(|e| e["approval_id"] == id.as_str()));
    assert!(entries.iter().any(|e| e["event"] == "override_issued" && e["approval_id"] == id.as_str()));
    assert_eq!(up.count(), 1, "the agent API is never forwarded");
}

/// The override's approval, as stored.
async fn approval_status(gw: &TestGateway, id: &str) -> String {
    gw.approval(id).await.status.as_str().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_is_consumed_only_with_the_decision_that_uses_it() {
    // A rate limit of one action a minute on refunds, and an upstream that is not there.
    let up = Upstream::start().await;
    let policy = format!("{POLICY}  rate_limits:\n    - scope: action\n      rate: 1/m\n      burst: 1\n");
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, &policy, ""))], &admin_keys()).await;
    let tok = token("pay-agent");
    let escalated = |amount: u64| {
        let tok = tok.clone();
        let gw = &gw;
        async move {
            let v: Value = gw.refund(&tok, amount, None).await.json().await.unwrap();
            let id = v["approval_id"].as_str().unwrap().to_string();
            let over = gw.approve(&id, APPROVER).await.1["override_token"].as_str().unwrap().to_string();
            (id, over)
        }
    };
    // Take the one refund the minute allows.
    assert_eq!(gw.refund(&tok, 1000, None).await.status(), 200);
    // Refused by the rate limit after the override was accepted: the approval is not spent.
    let (id, over) = escalated(6000).await;
    let r = gw.refund(&tok, 6000, Some(&over)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(approval_status(&gw, &id).await, "approved", "a refused request used up the approval");
    assert_eq!(up.count(), 1);

    // Accepted, recorded, then the forward fails: the decision that consumed it says so, with
    // the approval and the token's jti, in the same commit.
    let gw2 = {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        TestGateway::start(&[("pay.yaml", manifest("pay-agent", addr, POLICY, ""))], &admin_keys()).await
    };
    let v: Value = gw2.refund(&tok, 6000, None).await.json().await.unwrap();
    let id2 = v["approval_id"].as_str().unwrap().to_string();
    let (_, body) = gw2.approve(&id2, APPROVER).await;
    let over2 = body["override_token"].as_str().unwrap().to_string();
    let r = gw2.refund(&tok, 6000, Some(&over2)).await;
    assert_eq!(r.status(), 502);
    let record = record_of(&r);
    assert_eq!(approval_status(&gw2, &id2).await, "consumed");
    let entry = gw2.entry(record);
    assert_eq!(entry["kind"], "decision");
    assert_eq!(entry["approval_id"], id2.as_str());
    assert_eq!(entry["reasons"][1]["code"], "override_accepted");
    let jti = entry["override_jti"].as_str().expect("the token's jti is recorded");
    let approved =
        gw2.entries().into_iter().find(|e| e["event"] == "approved" && e["approval_id"] == id2.as_str()).unwrap();
    assert_eq!(approved["override_jti"], jti);
    let r = gw2.refund(&tok, 6000, Some(&over2)).await;
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "override_token_already_used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uses_of_one_override_forward_exactly_once() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], &admin_keys()).await;
    let tok = token("pay-agent");
    let v: Value = gw.refund(&tok, 6000, None).await.json().await.unwrap();
    let id = v["approval_id"].as_str().unwrap().to_string();
    let over = gw.approve(&id, APPROVER).await.1["override_token"].as_str().unwrap().to_string();
    let tries: Vec<_> = (0..16)
        .map(|_| {
            let (url, tok, over) = (gw.base("/shop/v1/refunds"), tok.clone(), over.clone());
            tokio::spawn(async move { refund_at(&url, &tok, 6000, Some(&over)).await.status().as_u16() })
        })
        .collect();
    let statuses = join_all(tries).await;
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 403).count(), 15, "{statuses:?}");
    assert_eq!(up.count(), 1);
    let accepted = decisions(&gw.entries())
        .into_iter()
        .filter(|e| e["approval_id"] == id.as_str() && e["decision"] == "allow")
        .count();
    assert_eq!(accepted, 1, "one decision entry consumed the approval");
}

/// A gateway started with one broken manifest beside a valid one serves the valid agent; the
/// broken agent's requests are refused `manifest_invalid` and recorded; `/readyz` lists the file
/// and stays 200 (503 only when no manifest is valid); `check` still exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_manifest_at_start_refuses_only_its_agent() {
    let up = Upstream::start().await;
    let broken = manifest("broken-agent", up.addr, POLICY, "bogus_key: 1\n");
    let gw =
        TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, "")), ("broken.yaml", broken)], "")
            .await;
    let r = charges_as(&gw, "pay-agent").await;
    assert_eq!(r.status(), 200, "the valid agent is served");
    let r = charges_as(&gw, "broken-agent").await;
    assert_eq!(r.status(), 403);
    let record = r.headers().get("x-uapk-record").map(|v| v.to_str().unwrap().to_string());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reasons"][0]["code"], "manifest_invalid", "{body}");
    assert!(record.is_some(), "the refusal is recorded");
    assert_eq!(up.count(), 1, "only the valid agent's request reached the upstream");
    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(ready["manifests"], 1, "{ready}");
    assert_eq!(ready["invalid_manifests"][0]["agent"], "broken-agent", "{ready}");
    assert!(ready["invalid_manifests"][0]["file"].as_str().unwrap().ends_with("broken.yaml"), "{ready}");
    let entries = gw.entries();
    let config = entries.iter().find(|e| e["kind"] == "config").expect("config entry");
    assert_eq!(config["invalid_manifests"][0]["agent"], "broken-agent", "{config}");
    let refused = decisions(&entries)
        .into_iter()
        .find(|e| e["reasons"][0]["code"] == "manifest_invalid")
        .expect("the manifest_invalid refusal is in the log");
    assert_eq!(refused["decision"], "deny");
    let (code, _, err) = run_cli(&["check", "-c", gw.config_path.to_str().unwrap()], gw.dir.path());
    assert_eq!(code, 1, "check must still fail: {err}");
    assert!(err.contains("bogus_key"), "{err}");

    // Fixing the file serves the agent, without a restart.
    std::fs::write(gw.dir.path().join("policies/broken.yaml"), manifest("broken-agent", up.addr, POLICY, "")).unwrap();
    wait_for_agent(&gw, "broken-agent", 200).await;
    assert_eq!(gw.readyz().await.1["invalid_manifests"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_broken_manifests_are_not_ready() {
    let up = Upstream::start().await;
    let gw =
        TestGateway::start(&[("broken.yaml", manifest("broken-agent", up.addr, POLICY, "bogus_key: 1\n"))], "").await;
    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(ready["invalid_manifests"][0]["agent"], "broken-agent", "{ready}");
    let r = charges_as(&gw, "broken-agent").await;
    assert_eq!(r.status(), 403);
    assert_eq!(up.count(), 0);
}

/// A rotated Secret: the credential file a manifest reads is replaced through the kubelet's
/// `..data` swap; the next requests carry the new credential without SIGHUP, and the reload is
/// recorded with the file's new SHA-256, never its content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_credential_file_is_used_without_sighup() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let secrets = policies.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    kubelet_swap(&secrets, 1, "shop.key", "sk_old_0123456789\n");
    let m = manifest("pay-agent", up.addr, POLICY, "").replace(
        "    base_url: http://",
        "    credentials:\n      - { header: Authorization, value: \"Bearer ${file:secrets/shop.key}\" }\n    base_url: http://",
    );
    std::fs::write(policies.join("pay.yaml"), m).unwrap();
    let gw = TestGateway::start_in(dir, &[], "").await;
    let get = || async { gw.get("/shop/v1/charges/a", &token("pay-agent")).await };
    assert_eq!(get().await.status(), 200);
    assert_eq!(up.last().headers["authorization"], "Bearer sk_old_0123456789");
    kubelet_swap(&gw.dir.path().join("policies/secrets"), 2, "shop.key", "sk_new_9876543210\n");
    let t = Instant::now();
    loop {
        assert_eq!(get().await.status(), 200);
        if up.last().headers["authorization"] == "Bearer sk_new_9876543210" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the rotated credential was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Recorded: a reload naming the file's new SHA-256; the secret itself nowhere in the log.
    let new_sha = sha256_hex(b"sk_new_9876543210\n");
    let entries = gw.entries();
    let reload =
        entries.iter().rfind(|e| e["kind"] == "config" && e["event"] == "reload").expect("a reload entry").clone();
    let files = reload["files"].as_object().expect("files");
    let (path, sha) = files.iter().find(|(p, _)| p.ends_with("secrets/shop.key")).expect("the credential file");
    assert_eq!(sha, &json!(new_sha), "{path}");
    let log = serde_json::to_string(&entries).unwrap();
    assert!(!log.contains("sk_new_") && !log.contains("sk_old_"), "a credential reached the log");
}
