//! End to end: budgets across restarts, write-ahead durability, credential injection, token
//! refusals, the explicit proxy, and `verify` / `check` from the real binary.

use crate::support::*;
use serde_json::{Value, json};

const BUDGET_POLICY: &str = r#"  budgets:
    - window: day
      scope: agent
      max_actions: 5
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_against_a_budget_forward_exactly_the_remainder_and_survive_restart() {
    let up = Upstream::start().await;
    let files = [("pay.yaml", manifest("pay-agent", up.addr, BUDGET_POLICY, ""))];
    let gw = TestGateway::start(&files, "").await;
    let tok = token("pay-agent");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (url, tok) = (gw.base(&format!("/shop/v1/charges/ch_{i}")), tok.clone());
        tasks.push(tokio::spawn(async move {
            let r = client().get(url).header("x-uapk-capability", tok).send().await.unwrap();
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (s, v)
        }));
    }
    let mut ok = 0;
    let mut exceeded = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            200 => ok += 1,
            403 if v["reasons"][0]["code"] == "budget_exceeded" => exceeded += 1,
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!((ok, exceeded), (5, 15));
    assert_eq!(up.count(), 5, "exactly five reach the upstream");

    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &files, "").await;
    let d = decisions(&gw.entries());
    assert_eq!(d.len(), 20, "20 attempts recorded");
    assert_eq!(d.iter().filter(|e| e["decision"] == "allow").count(), 5, "5 forwarded");
    // The counters were rebuilt from the log: the budget is still spent.
    let r = gw.get("/shop/v1/charges/ch_x", &tok).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["reasons"][0]["code"], "budget_exceeded");
    assert_eq!(up.count(), 5);
    let startups = gw.entries().iter().filter(|e| e["kind"] == "startup").count();
    assert_eq!(startups, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_never_sees_a_request_whose_decision_is_not_durable() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, "", ""))], "").await;
    // The upstream looks the request up in the committed log before it answers.
    let log = gw.log();
    up.set_hook(move |seen| {
        let marker = seen.headers.get("x-test-marker").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let found = log.entries().iter().any(|e| {
            e["kind"] == "decision" && e["decision"] == "allow" && e["headers"]["x-test-marker"] == json!(marker)
        });
        if found { (200, "{\"logged\":true}".into()) } else { (599, "{\"logged\":false}".into()) }
    });
    let tok = token("pay-agent");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (url, tok) = (gw.base("/shop/v1/charges/ch_1"), tok.clone());
        tasks.push(tokio::spawn(async move {
            client()
                .get(url)
                .header("x-uapk-capability", tok)
                .header("x-test-marker", format!("m{i}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "the upstream saw a request before its decision was committed");
    }
    assert_eq!(up.count(), 40);
    // Each forwarded request also gets an outcome entry after its response.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let outcomes = gw.entries().into_iter().filter(|e| e["kind"] == "outcome").count();
    assert_eq!(outcomes, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_injected_replace_the_agents_and_never_leak() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "sk_live_SUPERSECRET_4242";
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/shop.key"), format!("{secret}\n")).unwrap();
    let m = manifest("pay-agent", up.addr, "", "").replace(
        "    routes:\n      - methods: [POST]\n        path: /v1/refunds",
        "    credentials:\n      - header: Authorization\n        value: \"Bearer ${file:shop.key}\"\n    routes:\n      - methods: [POST]\n        path: /v1/refunds",
    );
    let gw = TestGateway::start_in(dir, &[("pay.yaml", m)], "").await;
    let r = client()
        .get(gw.base("/shop/v1/charges/ch_1?expand=x"))
        .header("x-uapk-capability", token("pay-agent"))
        .header("authorization", "Bearer agent-own-key")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-uapk-note", "internal")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = format!("{:?}", r.headers());
    let body = r.text().await.unwrap();
    let seen = up.last();
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth, vec![&format!("Bearer {secret}")], "exactly the injected credential");
    assert!(seen.headers.get("proxy-authorization").is_none());
    assert!(seen.headers.get("x-uapk-capability").is_none());
    assert!(seen.headers.get("x-uapk-note").is_none());
    assert!(seen.headers.get("traceparent").is_some(), "traceparent passes through");
    assert_eq!(seen.path, "/v1/charges/ch_1?expand=x");
    // The secret appears nowhere the agent or an auditor can read.
    assert!(!body.contains(secret) && !headers.contains(secret));
    let bytes = std::fs::read(gw.db_path()).unwrap();
    let log = String::from_utf8_lossy(&bytes);
    assert!(!log.contains(secret), "the secret is in the audit file");
    assert!(!log.contains("agent-own-key"), "the agent's own credential is recorded only as a hash");
    let entry = decisions(&gw.entries()).pop().unwrap();
    assert!(entry["headers"]["authorization"].as_str().unwrap().starts_with("sha256:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_makes_the_connector_deny() {
    let up = Upstream::start().await;
    let m = manifest("pay-agent", up.addr, "", "").replace(
        "    routes:\n      - methods: [POST]\n        path: /v1/refunds",
        "    credentials:\n      - header: Authorization\n        value: \"Bearer ${env:UAPK_TEST_UNSET_SECRET}\"\n    routes:\n      - methods: [POST]\n        path: /v1/refunds",
    );
    let gw = TestGateway::start(&[("pay.yaml", m)], "").await;
    let r = gw.get("/shop/v1/charges/ch_1", &token("pay-agent")).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["reasons"][0]["code"], "connector_unavailable");
    assert_eq!(up.count(), 0, "never forwarded unauthenticated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_with_the_right_code() {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, "", ""))], "").await;
    let good = token("pay-agent");
    let parts: Vec<&str> = good.split('.').collect();
    let payload = |c: &uapk_gateway::identity::CapabilityClaims| b64(serde_json::to_string(c).unwrap().as_bytes());
    let c = claims("pay-agent");
    let alg_none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), payload(&c));
    let hs256 = {
        use hmac::{Hmac, Mac};
        let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = payload(&c);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(issuer_pub_pem().as_bytes()).unwrap();
        mac.update(format!("{header}.{body}").as_bytes());
        format!("{header}.{body}.{}", b64(&mac.finalize().into_bytes()))
    };
    let mut t = claims("pay-agent");
    t.nbf = Some(now() + 600);
    let not_yet = mint(&t);
    let mut t = claims("pay-agent");
    t.exp = t.iat + 48 * 3600;
    let too_long = mint(&t);
    let mut t = claims("pay-agent");
    t.aud = uapk_gateway::identity::Audience::from(vec!["someone-else".to_string()]);
    let wrong_aud = mint(&t);
    let mut t = claims("pay-agent");
    t.iss = "stranger".into();
    let unknown_iss = mint(&t);
    let mut t = claims("pay-agent");
    t.sub = "pay-agent".into();
    let tampered = {
        let mut c2 = claims("pay-agent");
        c2.connectors = Some(vec!["everything".into()]);
        format!("{}.{}.{}", parts[0], payload(&c2), parts[2])
    };
    let truncated = good[..good.len() - 10].to_string();
    let other_key = uapk_gateway::identity::mint(&ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]), None, &t).unwrap();
    let cases = [
        ("alg none", alg_none, "capability_token_invalid"),
        ("HS256 keyed with the public key", hs256, "capability_token_invalid"),
        ("not yet valid", not_yet, "capability_token_invalid"),
        ("lifetime above max", too_long, "capability_token_invalid"),
        ("wrong aud", wrong_aud, "capability_token_invalid"),
        ("unknown iss", unknown_iss, "capability_token_invalid"),
        ("tampered payload", tampered, "capability_token_invalid"),
        ("truncated", truncated, "capability_token_invalid"),
        ("foreign key", other_key, "capability_token_invalid"),
        ("wrong sub", token("ghost-agent"), "manifest_not_found"),
    ];
    for (name, tok, code) in cases {
        let r = gw.get("/shop/v1/charges/ch_1", &tok).await;
        assert_eq!(r.status(), 403, "{name}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["reasons"][0]["code"], code, "{name}: {v}");
    }
    assert_eq!(up.count(), 0);
    let r = gw.get("/shop/v1/charges/ch_1", &good).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_proxy_decides_absolute_form_requests_and_asks_for_auth() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let target = format!("http://127.0.0.1:{}/v1/charges/ch_1", up.addr.port());
    // No token: 407 with Proxy-Authenticate and the JSON body.
    let r = proxied_client(&gw, None).get(&target).send().await.unwrap();
    assert_eq!(r.status(), 407);
    assert_eq!(r.headers()["proxy-authenticate"], "Bearer realm=\"uapk-gateway\"");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["reasons"][0]["code"], "capability_token_required");
    // With the token as the Basic password: allowed.
    let tok = token("pay-agent");
    let r = proxied_client(&gw, Some(&tok)).get(&target).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-uapk-record"));
    assert_eq!(up.last().path, "/v1/charges/ch_1");
    assert!(up.last().headers.get("proxy-authorization").is_none());
    // A host no connector names.
    let r = proxied_client(&gw, Some(&tok)).get("http://unknown.test/x").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["reasons"][0]["code"], "host_not_allowed");
    // A port the connector does not list.
    let r = proxied_client(&gw, Some(&tok)).get("http://127.0.0.1:1/v1/charges/x").send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["reasons"][0]["code"], "host_not_allowed");
    // A route that is not declared, via the explicit proxy.
    let r = proxied_client(&gw, Some(&tok)).put(&target).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["reasons"][0]["code"], "route_not_allowed");
    assert_eq!(up.count(), 1);
    let d = decisions(&gw.entries());
    assert_eq!(d.iter().filter(|e| e["via"] == "explicit").count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_502_and_recorded() {
    let up = Upstream::start().await;
    // A connector whose base_url points at a closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let m = manifest("pay-agent", closed, "", "");
    let gw = TestGateway::start(&[("pay.yaml", m)], "").await;
    let r = gw.get("/shop/v1/charges/ch_1", &token("pay-agent")).await;
    assert_eq!(r.status(), 502);
    let outcome = gw.outcome_of(record_of(&r)).await;
    assert_eq!(outcome["status"], "502");
    assert!(outcome["error"].as_str().unwrap().contains("unreachable"));
    drop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_ambiguous_paths_are_refused() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(
        &[("pay.yaml", manifest("pay-agent", up.addr, "", ""))],
        "limits:\n  max_body_bytes: 1024\n",
    )
    .await;
    let tok = token("pay-agent");
    let big = json!({"amount": 100, "currency": "USD", "customer": "x".repeat(4096)});
    let r =
        client().post(gw.base("/shop/v1/refunds")).header("x-uapk-capability", &tok).json(&big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    // Sent raw: HTTP clients normalise dot segments before sending.
    for p in
        ["/shop/v1/charges/../refunds", "/shop/v1/charges/%2e%2e/x", "/shop/v1/charges/a%2Fb", "/shop/v1/./charges/x"]
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        let req = format!("GET {p} HTTP/1.1\r\nHost: x\r\nx-uapk-capability: {tok}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{p}: {out}");
    }
    assert_eq!(up.count(), 0);
    // The gateway keeps serving.
    let r = gw.get("/shop/v1/charges/ok", &tok).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_on_a_real_log_and_names_the_first_bad_index_after_tampering() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let tok = token("pay-agent");
    for i in 0..10 {
        let path = if i % 2 == 0 { "/shop/v1/charges/a" } else { "/shop/v1/nope" };
        gw.get(path, &tok).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let dir = gw.stop().await;
    let data = dir.path().join("data");
    let db = data.join("audit.redb");
    let key = data.join("gateway.pub.pem");
    let (args_db, args_key) = (db.to_str().unwrap().to_string(), key.to_str().unwrap().to_string());
    let verify = |cwd: &std::path::Path| run_cli(&["verify", "--db", &args_db, "--key", &args_key], cwd);
    let (code, out, err) = verify(dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok:"), "{out}");

    let pristine = std::fs::read(&db).unwrap();
    let tampered = |f: &dyn Fn(&mut Tables)| {
        std::fs::write(&db, &pristine).unwrap();
        tamper(&db, f);
    };
    // One byte of entry 5 changed.
    tampered(&|t| {
        let mut e = t.entry(5);
        let pos = e.len() / 2;
        e[pos] ^= 0x01;
        t.put_entry(5, &e);
    });
    let (code, _, err) = verify(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("index 5"), "{err}");
    // Entry 3 removed.
    tampered(&|t| t.remove_entry(3));
    let (code, _, err) = verify(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("index 3"), "{err}");
    // Entries 6 and 7 swapped.
    tampered(&|t| {
        let (a, b) = (t.entry(6), t.entry(7));
        t.put_entry(6, &b);
        t.put_entry(7, &a);
    });
    let (code, _, err) = verify(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("index 6"), "{err}");
    // Restored: passes again.
    std::fs::write(&db, &pristine).unwrap();
    assert_eq!(verify(dir.path()).0, 0);
    // Export and verify the bundle with only the bundle and the key.
    let out = dir.path().join("bundle");
    let (code, o, e) = run_cli(
        &[
            "export",
            "--db",
            &args_db,
            "--out",
            out.to_str().unwrap(),
            "--gateway-key",
            data.join("gateway.pem").to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{o}{e}");
    let (code, o, e) = run_cli(&["verify", "--bundle", out.to_str().unwrap(), "--key", &args_key], dir.path());
    assert_eq!(code, 0, "{o}{e}");
}

#[test]
fn check_reports_errors_with_location_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let up: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let bad = manifest("pay-agent", up, "  connectors: { allow: [shop, bank] }\n", "");
    std::fs::write(dir.path().join("policies/pay.yaml"), bad).unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), "policies: policies\n").unwrap();
    let (code, out, err) = run_cli(&["check", "-c", "gateway.yaml"], dir.path());
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("pay.yaml:"), "{err}");
    assert!(err.contains("policy.connectors.allow[1]"), "{err}");
    // Fixed: exit 0.
    let good = manifest("pay-agent", up, "  connectors: { allow: [shop] }\n", "");
    std::fs::write(dir.path().join("policies/pay.yaml"), good).unwrap();
    let (code, out, err) = run_cli(&["check", "-c", "gateway.yaml"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("pay-agent"));
    // The shipped examples pass.
    let (code, out, err) = run_cli(&["check"], std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
    assert_eq!(code, 0, "{out}{err}");
    // No manifest at all is not "ok": every request would be refused.
    std::fs::remove_file(dir.path().join("policies/pay.yaml")).unwrap();
    let (code, out, err) = run_cli(&["check", "-c", "gateway.yaml"], dir.path());
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no manifests"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_manifests_is_not_ready() {
    let gw = TestGateway::start(&[], "").await;
    let (status, v) = gw.readyz().await;
    assert_eq!(status, 503);
    assert_eq!((v["ready"].as_bool(), v["manifests"].as_u64()), (Some(false), Some(0)), "{v}");
    // Liveness is unaffected: the process is healthy, it just has nothing to serve.
    let r = client().get(gw.admin_url("/livez")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_pass_through_after_the_decision() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A WebSocket upstream: accepts `Upgrade: websocket`, then echoes bytes.
    let up = websocket_upstream(true).await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up, "", ""))], "").await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let req = format!(
        "GET /shop/v1/charges/stream HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nx-uapk-capability: {}\r\n\r\n",
        token("pay-agent")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await.to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("x-uapk-record"), "{head}");
    s.write_all(b"hello through the gateway").await.unwrap();
    let mut echo = [0u8; 25];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"hello through the gateway");
    drop(s);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let outcome =
        gw.entries().into_iter().find(|e| e["kind"] == "outcome").expect("outcome of the upgraded connection");
    assert_eq!(outcome["status"], "101");
    assert_eq!(outcome["bytes"], "50");
}
