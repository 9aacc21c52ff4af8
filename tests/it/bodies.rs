//! Evidence for every request (SPEC §14.8): every request body with content is hashed — in the
//! decision entry when the gateway buffered it, in the outcome entry while it streams otherwise —
//! and large requests are recorded with long strings cut (their full hash and length in the
//! entry's `truncated` map), never refused for their size.

use crate::support::*;
use std::path::Path;

/// Not JSON, not text: bytes no route reads.
fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_hashed_in_the_outcome_and_a_buffered_one_in_the_decision() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, "", ""))], "").await;
    let tok = token("pay-agent");

    // 1.3 MB on a route that reads no body params: streamed, hashed on the way.
    let body = blob(1_300_000);
    let r = post(&gw, "/other/upload", &tok, false, body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let idx = record_of(&r);
    r.bytes().await.unwrap();
    let received = up.last().body;
    assert_eq!(received.len(), 1_300_000, "the upstream got the whole body");
    let outcome = gw.outcome_of(idx).await;
    assert_eq!(outcome["request_body_sha256"], sha256_hex(&received), "{outcome}");
    assert_eq!(outcome["request_body_len"], "1300000");
    assert!(outcome.get("request_body_complete").is_none(), "{outcome}");
    let decision = &gw.entries()[idx as usize];
    assert!(decision.get("body_sha256").is_none(), "a streamed body is not hashed before it is read: {decision}");

    // A body the route reads is buffered and hashed in the decision entry, not twice.
    let json_body = br#"{"amount":"12","currency":"USD"}"#.to_vec();
    let r = post(&gw, "/shop/v1/charges", &tok, true, json_body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let idx = record_of(&r);
    r.bytes().await.unwrap();
    let decision = &gw.entries()[idx as usize];
    assert_eq!(decision["body_sha256"], sha256_hex(&json_body), "{decision}");
    assert_eq!(decision["body_len"], json_body.len().to_string().as_str());
    assert_eq!(up.last().body.as_ref(), &json_body[..]);
    let outcome = gw.outcome_of(idx).await;
    assert!(outcome.get("request_body_sha256").is_none(), "{outcome}");

    // A request without a body has no body hash.
    let r = gw.get("/shop/v1/charges/c1", &tok).await;
    assert_eq!(r.status(), 200);
    let idx = record_of(&r);
    r.bytes().await.unwrap();
    let outcome = gw.outcome_of(idx).await;
    assert!(outcome.get("request_body_sha256").is_none() && outcome.get("request_body_len").is_none(), "{outcome}");

    // A chunked body of unknown length, sent in pieces, is hashed as well.
    let pieces: Vec<Vec<u8>> = (0..20).map(|i| blob(10_000 + i)).collect();
    let whole: Vec<u8> = pieces.concat();
    let head = format!(
        "PUT /other/chunks HTTP/1.1\r\nHost: {}\r\nx-uapk-capability: {tok}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        gw.proxy
    );
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(head.as_bytes()).await.unwrap();
    for p in &pieces {
        s.write_all(format!("{:x}\r\n", p.len()).as_bytes()).await.unwrap();
        s.write_all(p).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
        s.flush().await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let idx = record_header(&answer).unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(up.last().body.as_ref(), &whole[..]);
    let outcome = gw.outcome_of(idx).await;
    assert_eq!(outcome["request_body_sha256"], sha256_hex(&whole), "{outcome}");
    assert_eq!(outcome["request_body_len"], whole.len().to_string().as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_none_records_no_body_hash_anywhere() {
    let up = Upstream::start().await;
    let policy = "  approval:\n    amount_above: { USD: \"50.00\" }\n";
    let m = manifest("pay-agent", up.addr, policy, "audit:\n  bodies: none\n");
    let gw = TestGateway::start(&[("pay.yaml", m)], "").await;
    let tok = token("pay-agent");
    let r = post(&gw, "/other/upload", &tok, false, blob(300_000)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let streamed = record_of(&r);
    r.bytes().await.unwrap();
    assert_eq!(up.last().body.len(), 300_000);
    let r = post(&gw, "/shop/v1/charges", &tok, true, r#"{"amount":"12","currency":"USD"}"#).send().await.unwrap();
    assert_eq!(r.status(), 200, "params are still read from the body");
    let buffered = record_of(&r);
    r.bytes().await.unwrap();
    // An escalation: its approval record holds no body hash either.
    let r = post(&gw, "/shop/v1/refunds", &tok, true, r#"{"amount":7500,"currency":"USD","customer":"cus_1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let id = r.headers()["x-uapk-approval"].to_str().unwrap().to_string();
    let approval = gw.approval(&id).await;
    assert!(approval.body_sha256.is_none() && approval.body_len.is_none(), "{approval:?}");
    gw.outcome_of(streamed).await;
    gw.outcome_of(buffered).await;
    let entries = gw.entries();
    assert_eq!(entries[buffered as usize]["params"]["amount"], "12");
    for e in &entries {
        for key in ["body_sha256", "body_len", "request_body_sha256", "request_body_len", "body", "request_body"] {
            assert!(e.get(key).is_none(), "bodies: none, yet {key} is recorded: {e}");
        }
    }
}

/// A 17 KB value where an entry holds it: in the path, the query or a header.
#[derive(Clone, Copy, Debug)]
enum Where {
    Path,
    Query,
    Header,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_paths_queries_and_headers_are_recorded_cut_never_refused() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let tok = token("pay-agent");
    let long: String = (0..17_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let encoded = long.clone();
    for (place, allowed) in [
        (Where::Path, true),
        (Where::Path, false),
        (Where::Query, true),
        (Where::Query, false),
        (Where::Header, true),
        (Where::Header, false),
    ] {
        // `/v1/charges/**` is allowed; `/v1/nope` matches no route (403 route_not_allowed).
        let base = if allowed { "/shop/v1/charges/c1" } else { "/shop/v1/nope" };
        let mut req = match place {
            Where::Path => client().get(gw.base(&format!("{base}/{encoded}"))),
            Where::Query => client().get(gw.base(&format!("{base}?q={encoded}"))),
            Where::Header => client().get(gw.base(base)).header("x-long", long.as_str()),
        };
        req = req.header("x-uapk-capability", &tok);
        let before = up.count();
        let r = req.send().await.unwrap();
        let want = if allowed { 200 } else { 403 };
        assert_eq!(r.status(), want, "{place:?} allowed={allowed}: {}", r.text().await.unwrap_or_default());
        let idx = record_of(&r);
        r.bytes().await.unwrap();
        assert_eq!(up.count(), before + usize::from(allowed));
        let e = &gw.entries()[idx as usize];
        assert_eq!(e["kind"], "decision");
        assert_eq!(e["decision"], if allowed { "allow" } else { "deny" });
        let (key, full, stored) = match place {
            Where::Path => ("path", format!("{}/{encoded}", &base[5..]), &e["path"]),
            Where::Query => ("query", format!("q={encoded}"), &e["query"]),
            Where::Header => ("headers.x-long", long.clone(), &e["headers"]["x-long"]),
        };
        let t = &e["truncated"][key];
        assert_eq!(t["sha256"], sha256_hex(full.as_bytes()), "{place:?}: {e}");
        assert_eq!(t["len"], full.len().to_string().as_str(), "{place:?}");
        let stored = stored.as_str().unwrap_or_else(|| panic!("{place:?}: {e}"));
        assert!(stored.ends_with('…'), "{stored}");
        let kept = stored.trim_end_matches('…');
        assert!(kept.len() == 256 && full.starts_with(kept), "{place:?}: {kept}");
        assert!(serde_json::to_vec(e).unwrap().len() <= 16 * 1024);
        if allowed {
            let seen = up.last();
            match place {
                Where::Header => assert_eq!(seen.headers["x-long"], long.as_str()),
                _ => assert!(seen.path.ends_with(&full), "the upstream got the whole target"),
            }
        }
    }

    // Very many long headers: each is cut, and the entry, still too large, drops `headers` whole.
    let mut req = client().get(gw.base("/shop/v1/charges/many")).header("x-uapk-capability", &tok);
    for i in 0..50 {
        req = req.header(format!("x-h-{i:02}"), "b".repeat(1100));
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let idx = record_of(&r);
    r.bytes().await.unwrap();
    let e = &gw.entries()[idx as usize];
    assert!(e.get("headers").is_none(), "{e}");
    assert_eq!(e["path"], "/v1/charges/many");
    let t = e["truncated"].as_object().unwrap();
    assert!(t.contains_key("headers") && !t.keys().any(|k| k.starts_with("headers.")), "{t:?}");

    let ready = client().get(format!("http://{}/readyz", gw.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200, "the log is still writable");
    let dir = gw.stop().await;
    let d = dir.path();
    let cfg = d.join("gateway.yaml");
    let (code, out, err) = run_cli(&["export", "-c", cfg.to_str().unwrap(), "--out", "bundle"], d);
    assert_eq!(code, 0, "{out}{err}");
    let key = d.join("data/gateway.pub.pem");
    let (code, out, err) = run_cli(&["verify", "--bundle", "bundle", "--key", key.to_str().unwrap()], d);
    assert_eq!(code, 0, "verify of the exported log: {out}{err}");
    // The standalone verifier for auditors agrees (where Python and `cryptography` are there).
    let python = std::process::Command::new("python3").args(["-c", "import cryptography"]).output();
    if python.is_ok_and(|o| o.status.success()) {
        let out = python_verify(Path::new("bundle"), &key, d);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let db = d.join("data/audit.redb");
    let (code, out, err) = run_cli(&["verify", "--db", db.to_str().unwrap(), "--key", key.to_str().unwrap()], d);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_full_records_the_body_of_safe_routes_only() {
    let up = Upstream::start().await;
    let m = manifest("pay-agent", up.addr, "", "audit:\n  bodies: full\n")
        .replace("        action: payment.charge\n", "        action: payment.charge\n        safe: true\n")
        .replace("        action: other.any\n", "        action: other.any\n        safe: true\n");
    assert_eq!(m.matches("safe: true").count(), 2);
    let gw = TestGateway::start(&[("pay.yaml", m)], "").await;
    let tok = token("pay-agent");
    let send = |path: &'static str, body: String| {
        let fut = post_json(&gw, path, &tok, body.into_bytes());
        async move {
            let (status, idx) = fut.await;
            assert_eq!(status, 200);
            idx
        }
    };
    // A safe route: the body in full.
    let small = r#"{"amount":"12","currency":"USD"}"#.to_string();
    let idx = send("/shop/v1/charges", small.clone()).await;
    assert_eq!(gw.entries()[idx as usize]["body"], small.as_str());
    // Long: cut like any long string, with the body's own hash.
    let long = format!(r#"{{"amount":"12","currency":"USD","note":"{}"}}"#, "n".repeat(3000));
    let idx = send("/shop/v1/charges", long.clone()).await;
    let e = &gw.entries()[idx as usize];
    assert_eq!(e["truncated"]["body"]["sha256"], sha256_hex(long.as_bytes()), "{e}");
    assert_eq!(e["body_sha256"], sha256_hex(long.as_bytes()));
    assert!(e["body"].as_str().unwrap().ends_with('…'));
    // A route not marked safe: hashed only (refunds escalate above 50; 12 is allowed).
    let idx = send("/shop/v1/refunds", r#"{"amount":"12","currency":"USD","customer":"c"}"#.into()).await;
    let e = &gw.entries()[idx as usize];
    assert!(e.get("body").is_none() && e.get("body_sha256").is_some(), "{e}");
    // No body params on a safe route: a small body is read before forwarding, so it is in the
    // decision entry; one above limits.hash_before_forward streams, into the outcome entry.
    let idx = send("/other/x", "plain text".into()).await;
    let e = &gw.entries()[idx as usize];
    assert_eq!(
        (e["body"].as_str(), e["body_sha256"].as_str()),
        (Some("plain text"), Some(&*sha256_hex(b"plain text")))
    );
    let o = gw.outcome_of(idx).await;
    assert!(o.get("request_body").is_none() && o.get("request_body_sha256").is_none(), "{o}");
    let long = "t".repeat(70_000);
    let idx = send("/other/x", long.clone()).await;
    let o = gw.outcome_of(idx).await;
    assert_eq!(o["request_body"], format!("{}…", "t".repeat(256)).as_str(), "{o}");
    assert_eq!(o["truncated"]["request_body"]["sha256"], sha256_hex(long.as_bytes()));
    assert_eq!(o["truncated"]["request_body"]["len"], "70000");
    // A small body read before its route was known is not recorded in full when the route
    // turns out not to be safe, or when none matches: hashed only.
    let r = post(&gw, "/shop/v1/nope", &tok, true, r#"{"secret":"s"}"#).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let e = &gw.entries()[record_of(&r) as usize];
    assert_eq!(e["reasons"][0]["code"], "route_not_allowed");
    assert!(e.get("body").is_none() && e["body_sha256"] == sha256_hex(br#"{"secret":"s"}"#).as_str(), "{e}");
}

/// SPEC §16.3: a body whose Content-Length is at most `limits.hash_before_forward` (64 KiB by
/// default) is hashed in the decision entry, written before anything is forwarded; its outcome
/// carries no second hash. Refused requests keep their body hash too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_is_hashed_in_the_decision_entry_before_it_is_forwarded() {
    let up = Upstream::start().await;
    // No policy block: the `other` connector (a route that reads no params) is open.
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, "", ""))], "").await;
    let tok = token("pay-agent");
    let send = |gw: &TestGateway, path: &str, body: Vec<u8>| post_json(gw, path, &tok, body);
    let small = br#"{"note":"a small JSON body no route reads","n":1}"#.to_vec();
    let (status, idx) = send(&gw, "/other/upload", small.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(up.last().body.as_ref(), &small[..]);
    let e = &gw.entries()[idx as usize];
    assert_eq!((e["kind"].as_str(), e["decision"].as_str()), (Some("decision"), Some("allow")));
    assert_eq!(e["body_sha256"], sha256_hex(&small), "{e}");
    assert_eq!(e["body_len"], small.len().to_string().as_str());
    let o = gw.outcome_of(idx).await;
    assert!(o.get("request_body_sha256").is_none() && o.get("request_body_len").is_none(), "{o}");
    // Exactly the limit: in the decision. One byte more: streamed, in the outcome.
    for (len, in_decision) in [(65_536usize, true), (65_537, false)] {
        let body = blob(len);
        let (status, idx) = send(&gw, "/other/upload", body.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(up.last().body.len(), len);
        let e = &gw.entries()[idx as usize];
        let o = gw.outcome_of(idx).await;
        if in_decision {
            assert_eq!(e["body_sha256"], sha256_hex(&body), "{len}: {e}");
            assert!(o.get("request_body_sha256").is_none(), "{len}: {o}");
        } else {
            assert!(e.get("body_sha256").is_none(), "{len}: {e}");
            assert_eq!(o["request_body_sha256"], sha256_hex(&body), "{len}: {o}");
        }
    }
    // Refusals keep the hash of the body they refused: no route, a connector the policy denies.
    let strict = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let before = up.count();
    for (path, code) in [("/shop/v1/nope", "route_not_allowed"), ("/other/upload", "tool_not_allowed")] {
        let body = format!(r#"{{"refused":"{path}"}}"#).into_bytes();
        let (status, idx) = send(&strict, path, body.clone()).await;
        assert_eq!(status, 403, "{path}");
        let e = &strict.entries()[idx as usize];
        assert_eq!(e["reasons"][0]["code"], code, "{path}: {e}");
        assert_eq!(e["body_sha256"], sha256_hex(&body), "{path}: {e}");
    }
    assert_eq!(up.count(), before);

    // limits.hash_before_forward: 0 streams every body (hashed in the outcome, as before).
    let streaming = TestGateway::start(
        &[("pay.yaml", manifest("pay-agent", up.addr, "", ""))],
        "limits:\n  hash_before_forward: 0\n",
    )
    .await;
    let (status, idx) = send(&streaming, "/other/upload", small.clone()).await;
    assert_eq!(status, 200);
    assert!(streaming.entries()[idx as usize].get("body_sha256").is_none());
    assert_eq!(streaming.outcome_of(idx).await["request_body_sha256"], sha256_hex(&small));
}

/// A POST of `body` to `path` on the base-URL listener with `tok`, as JSON when `json`.
fn post(
    gw: &TestGateway,
    path: &str,
    tok: &str,
    json: bool,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    let rb = client().post(gw.base(path)).header("x-uapk-capability", tok);
    if json { rb.header("content-type", "application/json") } else { rb }.body(body)
}

/// POSTs a JSON `body` to `path` on the base-URL listener with `tok`; the status and the record
/// index, once the response body is read.
fn post_json(
    gw: &TestGateway,
    path: &str,
    tok: &str,
    body: Vec<u8>,
) -> impl std::future::Future<Output = (u16, u64)> + use<> {
    let req = post(gw, path, tok, true, body);
    async move {
        let r = req.send().await.unwrap();
        let (status, idx) = (r.status().as_u16(), record_of(&r));
        r.bytes().await.unwrap();
        (status, idx)
    }
}
