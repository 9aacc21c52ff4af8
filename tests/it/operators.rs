//! Operators' own tools: the record stream a SIEM shipper reads (`GET /v1/records/stream`,
//! `uapk-gateway tail`), the `auditor` role, admin key ids that say who approved (`by`); and a
//! first run that stops on a busy port before generating anything.

use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;

const VIEWER: &str = "uapk_test_viewer";
const AUDITOR: &str = "uapk_test_auditor";
const APPROVER: &str = "uapk_test_alice";

fn admin_keys() -> String {
    crate::support::admin_keys(&[
        ("watcher", VIEWER, "viewer"),
        ("carol", AUDITOR, "auditor"),
        ("alice", APPROVER, "approver"),
    ])
}

/// `n` allowed requests, and their `outcome` entries committed (they follow the response).
async fn traffic(gw: &TestGateway, n: usize) {
    let tok = token("pay-agent");
    for i in 0..n {
        assert_eq!(gw.get(&format!("/shop/v1/charges/ch_{i}"), &tok).await.status(), 200);
    }
    settle(gw).await;
}

/// Waits until every decision has its outcome entry.
async fn settle(gw: &TestGateway) {
    eventually("every decision's outcome entry", Duration::from_secs(5), async || {
        let e = gw.entries();
        let count = |k: &str| e.iter().filter(|x| x["kind"] == k).count();
        (count("decision") == count("outcome")).then_some(())
    })
    .await
}

/// The lines of a finished stream.
async fn stream_all(gw: &TestGateway, query: &str, key: &str) -> (u16, String, Vec<Vec<u8>>) {
    let r = client().get(gw.admin_url(&format!("/v1/records/stream{query}"))).bearer_auth(key).send().await.unwrap();
    let status = r.status().as_u16();
    let ctype = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = r.bytes().await.unwrap();
    (status, ctype, if status == 200 { lines(&body) } else { Vec::new() })
}

fn lines(body: &[u8]) -> Vec<Vec<u8>> {
    assert!(body.is_empty() || body.ends_with(b"\n"), "every line ends with a newline");
    body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}

fn idx(line: &[u8]) -> u64 {
    let v: Value = serde_json::from_slice(line).unwrap();
    v["idx"].as_str().unwrap().parse().unwrap()
}

/// Reads a live stream until it has `want` lines (or fails after 10 s).
async fn read_lines(resp: &mut reqwest::Response, buf: &mut Vec<u8>, want: usize) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let have = buf.iter().filter(|&&b| b == b'\n').count();
        if have >= want {
            let end = buf.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(want - 1).unwrap().0;
            let taken: Vec<u8> = buf.drain(..=end).collect();
            return lines(&taken);
        }
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c),
            other => panic!("the stream ended or stalled with {have} of {want} lines: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_serves_stored_entries_from_an_index_then_live() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, "", ""))], &admin_keys()).await;
    traffic(&gw, 3).await;
    let all = gw.raw_entries();
    assert!(all.len() >= 8, "startup, config and 3 × (decision, outcome)");

    // No key: refused. Viewer and auditor: every entry, byte for byte as stored, in order.
    let r = client().get(gw.admin_url("/v1/records/stream?from=0&follow=false")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    for key in [VIEWER, AUDITOR] {
        let (status, ctype, got) = stream_all(&gw, "?from=0&follow=false", key).await;
        assert_eq!((status, ctype.as_str()), (200, "application/x-ndjson"));
        assert_eq!(got.len(), all.len());
        for ((i, bytes), line) in all.iter().zip(&got) {
            assert_eq!(line, bytes, "entry {i} is streamed exactly as stored");
        }
    }
    // From N: entries N.. only.
    let (_, _, got) = stream_all(&gw, "?from=5&follow=false", VIEWER).await;
    assert_eq!(got.iter().map(|l| idx(l)).collect::<Vec<_>>(), (5..all.len() as u64).collect::<Vec<_>>());
    assert_eq!(got[0], all[5].1);
    // Past the end: a clear refusal, never a silent wait; bad parameters: 400.
    let size = all.len();
    let r = client().get(gw.admin_url(&format!("/v1/records/stream?from={}", size + 1))).bearer_auth(VIEWER).send();
    let r = r.await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.json::<Value>().await.unwrap()["tree_size"], json!(size));
    for q in ["?from=-1", "?from=x", "?follow=maybe"] {
        let (status, _, _) = stream_all(&gw, q, VIEWER).await;
        assert_eq!(status, 400, "{q}");
    }

    // Live: a follower at the end sees the next request's entries as they commit.
    let mut live = client()
        .get(gw.admin_url(&format!("/v1/records/stream?from={size}")))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    assert_eq!(live.headers()["x-uapk-tree-size"], size.to_string().as_str());
    let mut buf = Vec::new();
    traffic(&gw, 1).await;
    let got = read_lines(&mut live, &mut buf, 2).await;
    assert_eq!(got.iter().map(|l| idx(l)).collect::<Vec<_>>(), vec![size as u64, size as u64 + 1]);
    let kinds: Vec<Value> = got.iter().map(|l| serde_json::from_slice::<Value>(l).unwrap()["kind"].clone()).collect();
    assert_eq!(kinds, [json!("decision"), json!("outcome")]);
    let after = gw.raw_entries();
    assert_eq!(got[0], after[size].1);
    // A second follower from 0 gets the whole log, the first keeps going.
    let mut second = client().get(gw.admin_url("/v1/records/stream?from=0")).bearer_auth(AUDITOR).send().await.unwrap();
    let mut buf2 = Vec::new();
    let whole = read_lines(&mut second, &mut buf2, after.len()).await;
    assert_eq!(whole.len(), after.len());
    traffic(&gw, 1).await;
    assert_eq!(read_lines(&mut live, &mut buf, 2).await.len(), 2);
    assert_eq!(idx(&read_lines(&mut second, &mut buf2, 2).await[1]), size as u64 + 3);
}

/// A shipper that reconnects with its last index + 1, across a gateway restart, ends up with
/// every index exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipper_resuming_from_its_last_index_loses_and_repeats_nothing_across_a_restart() {
    let up = Upstream::start().await;
    let files = [("pay.yaml", manifest("pay-agent", up.addr, "", ""))];
    let gw = TestGateway::start(&files, &admin_keys()).await;
    traffic(&gw, 2).await;
    let mut shipped: Vec<Vec<u8>> = Vec::new();
    let mut resp = client().get(gw.admin_url("/v1/records/stream?from=0")).bearer_auth(VIEWER).send().await.unwrap();
    // Entries keep arriving while the shipper reads; then the gateway stops under it.
    let busy = {
        let base = gw.base("/shop/v1/charges/live");
        let tok = token("pay-agent");
        tokio::spawn(async move {
            for _ in 0..10 {
                let _ = client().get(&base).header("x-uapk-capability", &tok).send().await;
            }
        })
    };
    let mut buf = Vec::new();
    shipped.extend(read_lines(&mut resp, &mut buf, 8).await);
    busy.await.unwrap();
    settle(&gw).await;
    let dir = gw.stop().await;
    // The stream ends with the gateway; the shipper keeps what arrived in whole lines.
    while let Ok(Some(c)) = resp.chunk().await {
        buf.extend_from_slice(&c);
    }
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    shipped.extend(lines(&buf[..complete]));

    // Entries the gateway wrote while stopping, and the next start's, come after reconnecting.
    let gw = TestGateway::start_in(dir, &files, "").await;
    traffic(&gw, 2).await;
    let last = idx(shipped.last().unwrap());
    let (status, _, rest) = stream_all(&gw, &format!("?from={}&follow=false", last + 1), VIEWER).await;
    assert_eq!(status, 200);
    shipped.extend(rest);

    let all = gw.raw_entries();
    let indexes: Vec<u64> = shipped.iter().map(|l| idx(l)).collect();
    assert_eq!(indexes, (0..all.len() as u64).collect::<Vec<_>>(), "no loss, no duplicate");
    for ((i, bytes), line) in all.iter().zip(&shipped) {
        assert_eq!(line, bytes, "entry {i}");
    }
    let startups = shipped.iter().filter(|l| serde_json::from_slice::<Value>(l).unwrap()["kind"] == "startup").count();
    assert_eq!(startups, 2, "both starts are in the shipped log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_the_log_from_the_file_or_the_running_gateway() {
    let up = Upstream::start().await;
    let files = [("pay.yaml", manifest("pay-agent", up.addr, "", ""))];
    // A fixed admin port: `tail` finds the running gateway through listeners.admin, across
    // the restart below.
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let yaml = gateway_yaml(dir.path(), "127.0.0.1:0", &admin, &format!("log_format: text\n{}", admin_keys()));
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    let gw = TestGateway::start_in(dir, &files, "").await;
    traffic(&gw, 2).await;
    let cfg = gw.config_path.to_str().unwrap().to_string();
    let d = gw.dir.path().to_path_buf();
    let tail = |args: Vec<String>, key: Option<&'static str>| {
        let d = d.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let env: Vec<(&str, &str)> = key.map(|k| ("UAPK_ADMIN_KEY", k)).into_iter().collect();
                run_cli_with(&args, &d, &env)
            })
            .await
            .unwrap()
        }
    };
    let args =
        |extra: &[&str]| -> Vec<String> { ["tail", "-c", &cfg].iter().chain(extra).map(|s| s.to_string()).collect() };

    // The gateway holds the file: without a key, a message saying how to read it live.
    let (code, out, err) = tail(args(&["--from", "3"]), None).await;
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("running gateway") && err.contains("UAPK_ADMIN_KEY"), "{err}");
    // With a viewer key: through the admin API, the same bytes as stored.
    let all = gw.raw_entries();
    let (code, out, err) = tail(args(&["--from", "3"]), Some(VIEWER)).await;
    assert_eq!(code, 0, "{err}");
    let want: Vec<u8> = all[3..].iter().flat_map(|(_, b)| b.iter().copied().chain([b'\n'])).collect();
    assert_eq!(out, String::from_utf8_lossy(&want));

    // --follow prints what commits next.
    let mut child = std::process::Command::new(bin())
        .args(args(&["--from", &all.len().to_string(), "--follow"]))
        .current_dir(&d)
        .env("UAPK_ADMIN_KEY", VIEWER)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    traffic(&gw, 1).await;
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(idx(first.as_bytes()), all.len() as u64);
    assert_eq!(first.as_bytes(), gw.raw_entries()[all.len()].1.as_slice());
    // The follower survives the gateway's restart and picks up from the file, then from the
    // new gateway: every index once.
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &files, "").await;
    traffic(&gw, 1).await;
    let total = gw.raw_entries().len();
    let mut seen = vec![idx(first.as_bytes())];
    while seen.len() < total - all.len() {
        let l = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
        seen.push(idx(l.as_bytes()));
    }
    assert_eq!(seen, (all.len() as u64..total as u64).collect::<Vec<_>>());
    let _ = child.kill();
    let _ = child.wait();

    // A stopped gateway's file is read directly, no key needed.
    let dir = gw.stop().await;
    let total = Log::file(dir.path().join("data/audit.redb")).raw_entries().len() as u64;
    let (code, out, err) = tail(args(&["--from", "1"]), None).await;
    assert_eq!(code, 0, "{err}");
    let got = lines(out.as_bytes());
    assert_eq!(got.iter().map(|l| idx(l)).collect::<Vec<_>>(), (1..total).collect::<Vec<_>>());
    let (code, _, err) = tail(args(&["--from", &(total + 1).to_string()]), None).await;
    assert_eq!(code, 2);
    assert!(err.contains("past the end"), "{err}");
    // --state keeps the next index: a later run resumes there.
    let (code, out, err) = tail(args(&["--state", "shipped.idx"]), None).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines(out.as_bytes()).len() as u64, total);
    assert_eq!(std::fs::read_to_string(d.join("shipped.idx")).unwrap(), format!("{total}\n"));
    let (code, out, _) = tail(args(&["--state", "shipped.idx"]), None).await;
    assert_eq!((code, out.len()), (0, 0), "nothing new");
    std::fs::write(d.join("shipped.idx"), "3\n").unwrap();
    let (_, out, _) = tail(args(&["--state", "shipped.idx"]), None).await;
    assert_eq!(lines(out.as_bytes()).iter().map(|l| idx(l)).collect::<Vec<_>>(), (3..total).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_reads_and_exports_but_never_decides_and_approvals_name_their_key() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], &admin_keys()).await;
    let escalate = || async {
        let r = gw.refund(&token("pay-agent"), 6000, None).await;
        assert_eq!(r.status(), 403);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["decision"], "escalate", "{b}");
        b["approval_id"].as_str().unwrap().to_string()
    };
    let id = escalate().await;
    let call = |method: &str, path: &str, key: &str| {
        client().request(method.parse().unwrap(), gw.admin_url(path)).bearer_auth(key).json(&json!({})).send()
    };

    // Reading: records, one record, checkpoint, proofs, approvals, manifests, stream, export.
    let reads = [
        ("GET", "/v1/records?from=0".to_string()),
        ("GET", "/v1/records/0".to_string()),
        ("GET", "/v1/checkpoint".to_string()),
        ("GET", "/v1/proof/inclusion?index=0".to_string()),
        ("GET", "/v1/proof/consistency?old=1&new=2".to_string()),
        ("GET", "/v1/approvals".to_string()),
        ("GET", format!("/v1/approvals/{id}")),
        ("GET", "/v1/manifests".to_string()),
        ("GET", "/v1/records/stream?follow=false".to_string()),
    ];
    for key in [VIEWER, AUDITOR, APPROVER] {
        for (m, p) in &reads {
            assert_eq!(call(m, p, key).await.unwrap().status(), 200, "{p} with the {key} key");
        }
    }
    // Export: the auditor (and the roles above it), not the viewer.
    let r = call("POST", "/v1/export", AUDITOR).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-tar");
    assert!(!r.bytes().await.unwrap().is_empty());
    assert_eq!(call("POST", "/v1/export", VIEWER).await.unwrap().status(), 403);
    assert_eq!(call("POST", "/v1/export", APPROVER).await.unwrap().status(), 200);
    // Deciding: never the auditor or the viewer; the approval stays pending.
    for key in [AUDITOR, VIEWER] {
        for action in ["approve", "deny"] {
            let r = call("POST", &format!("/v1/approvals/{id}/{action}"), key).await.unwrap();
            assert_eq!(r.status(), 403, "{action} with the {key} key");
            let b: Value = r.json().await.unwrap();
            assert!(b["error"].as_str().unwrap().contains("approver"), "{b}");
        }
    }
    let a: Value = call("GET", &format!("/v1/approvals/{id}"), AUDITOR).await.unwrap().json().await.unwrap();
    assert_eq!(a["status"], "pending");
    // The approver `alice` approves: the entry says so. The gateway's own events say `gateway`.
    let r = call("POST", &format!("/v1/approvals/{id}/approve"), APPROVER).await.unwrap();
    assert_eq!(r.status(), 200);
    let id2 = escalate().await;
    assert_eq!(call("POST", &format!("/v1/approvals/{id2}/deny"), APPROVER).await.unwrap().status(), 200);
    let entries = gw.entries();
    let event = |id: &str, ev: &str| {
        entries
            .iter()
            .find(|e| e["kind"] == "approval" && e["approval_id"] == id && e["event"] == ev)
            .unwrap_or_else(|| panic!("no {ev} entry for {id}"))
            .clone()
    };
    assert_eq!(event(&id, "approved")["by"], "alice");
    assert_eq!(event(&id2, "denied")["by"], "alice");
    assert_eq!(event(&id, "created")["by"], "gateway");
    assert!(entries.iter().filter(|e| e["kind"] == "approval").all(|e| e["by"].is_string()));
}

#[test]
fn check_refuses_two_admin_keys_with_one_id() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("pay.yaml"), manifest("pay-agent", "127.0.0.1:9".parse().unwrap(), "", "")).unwrap();
    let keys = |a: &str, b: &str| {
        format!(
            "policies: {}\nadmin:\n  keys:\n    - {{ id: {a}, sha256: {}, role: approver }}\n    - {{ id: {b}, sha256: {}, role: auditor }}\n",
            policies.display(),
            "1".repeat(64),
            "2".repeat(64)
        )
    };
    std::fs::write(dir.path().join("ok.yaml"), keys("alice", "carol")).unwrap();
    let (code, out, err) = run_cli(&["check", "-c", "ok.yaml"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    std::fs::write(dir.path().join("dup.yaml"), keys("alice", "alice")).unwrap();
    let (code, _, err) = run_cli(&["check", "-c", "dup.yaml"], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("admin.keys[1].id") && err.contains("\"alice\" is used twice"), "{err}");
    // `run` refuses it the same way, before it binds anything.
    let (code, _, err) = run_cli(&["run", "-c", "dup.yaml"], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("\"alice\" is used twice"), "{err}");
    // The id the gateway's own approval events carry is not a key id.
    std::fs::write(dir.path().join("gw.yaml"), keys("gateway", "carol")).unwrap();
    let (code, _, err) = run_cli(&["check", "-c", "gw.yaml"], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("reserved"), "{err}");
}

/// A port already in use is reported before the first run creates anything: no development
/// gateway key, no interception CA, no data directory.
#[test]
fn a_port_in_use_is_reported_before_any_key_or_ca_is_generated() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("pay.yaml"), manifest("pay-agent", "127.0.0.1:9".parse().unwrap(), "", "")).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for (which, listeners) in [
        ("listeners.proxy", format!("proxy: 127.0.0.1:{port}\n  admin: 127.0.0.1:0")),
        ("listeners.admin", format!("proxy: 127.0.0.1:0\n  admin: 127.0.0.1:{port}")),
    ] {
        let yaml = format!(
            "listeners:\n  {listeners}\npolicies: {}\ndata_dir: {}\nlog_format: text\n",
            policies.display(),
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
        let (code, _, err) = run_cli(&["run", "-c", "gateway.yaml"], dir.path());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(&format!("{which} 127.0.0.1:{port}")) && err.contains("in use"), "{err}");
        assert!(!dir.path().join("data").exists(), "{which}: nothing is generated for a gateway that cannot start");
    }
    drop(taken);
}
