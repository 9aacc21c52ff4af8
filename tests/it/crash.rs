//! The black-box promise under crashes: sustained load through the real binary, SIGKILL at
//! random moments, restart, and after every kill: `verify` passes, every request the upstream
//! received has a committed decision entry, and every response a client got with a record index
//! is in the log, with the SHA-256 of the body the upstream received: in the decision entry for a
//! body up to `limits.hash_before_forward` (whether a route reads it or not: SPEC §16.3, so no
//! kill can lose it), in the outcome entry for a longer one it streamed (an outcome follows the
//! response, so only the last requests of a client cut off by the kill may lack one).
//! `UAPK_CRASH_ROUNDS` (default 10) sets the number of kills; the README documents a longer run.

use crate::support::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("UAPK_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_policies(d, &[("pay.yaml", manifest("pay-agent", up.addr, "", ""))]);
    let (proxy, admin) = (free_port(), free_port());
    let config = d.join("gateway.yaml");
    std::fs::write(&config, gateway_yaml(d, &format!("127.0.0.1:{proxy}"), &format!("127.0.0.1:{admin}"), "")).unwrap();
    let tok = token("pay-agent");
    // marker → record index the client was told
    let acknowledged: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    // "r{round}-c{client}" → the last request number that client started.
    let (mut streamed_checked, mut buffered_checked, mut outcome_lost) = (0usize, 0usize, 0usize);
    let mut small_checked = 0usize;
    let mut seed: u64 = 0x9e3779b97f4a7c15 ^ now() as u64;
    for round in 0..rounds {
        let log = d.join(format!("gw-{round}.log"));
        let mut child = spawn_gateway(&config, &log, &[]);
        wait_ready(format!("127.0.0.1:{admin}").parse().unwrap(), &mut child, &log).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..8 {
            let (stop, acked, tok) = (stop.clone(), acknowledged.clone(), tok.clone());
            tasks.push(tokio::spawn(async move {
                let http = client();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let marker = format!("r{round}-c{c}-{i}");
                    // A quarter of the clients send no body, a quarter a body the route reads
                    // (buffered for its params), a quarter small JSON bodies to a route that
                    // reads no params (read and hashed before forwarding all the same), a
                    // quarter a 100 KB body no route reads (above 64 KiB: streamed).
                    let req = match c % 4 {
                        0 => http.get(format!("http://127.0.0.1:{proxy}/shop/v1/charges/x")),
                        1 => http
                            .post(format!("http://127.0.0.1:{proxy}/shop/v1/charges"))
                            .header("content-type", "application/json")
                            .body(format!(r#"{{"amount":"1","currency":"USD","marker":"{marker}"}}"#)),
                        2 => http
                            .post(format!("http://127.0.0.1:{proxy}/other/events"))
                            .header("content-type", "application/json")
                            .body(format!(r#"{{"event":"{marker}","n":{i}}}"#)),
                        _ => http
                            .post(format!("http://127.0.0.1:{proxy}/other/upload"))
                            .body(marker.repeat(100_000 / marker.len())),
                    };
                    let r = req
                        .header("x-uapk-capability", &tok)
                        .header("x-test-marker", &marker)
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status() == 200
                        && let Some(idx) =
                            r.headers().get("x-uapk-record").and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        && r.bytes().await.is_ok()
                    {
                        acked.lock().unwrap().insert(marker, idx);
                    }
                }
            }));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(100 + seed % 400)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        // verify passes on what the killed process left behind.
        let db = d.join("data/audit.redb");
        let key = d.join("data/gateway.pub.pem");
        let (code, out, err) = run_cli(&["verify", "--db", db.to_str().unwrap(), "--key", key.to_str().unwrap()], d);
        assert_eq!(code, 0, "round {round}: verify failed after SIGKILL: {out}{err}");
        // Every request the upstream received has a committed decision; every acknowledged
        // record index holds the request the client sent.
        let entries = Log::file(&db).entries();
        let by_marker: HashMap<String, usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e["kind"] == "decision" && e["decision"] == "allow")
            .filter_map(|(i, e)| e["headers"]["x-test-marker"].as_str().map(|m| (m.to_string(), i)))
            .collect();
        let outcomes: HashMap<&str, &Value> = entries
            .iter()
            .filter(|e| e["kind"] == "outcome")
            .filter_map(|e| Some((e["decision_idx"].as_str()?, e)))
            .collect();
        let mut lost_here = HashSet::new();
        for s in up.seen.lock().unwrap().iter() {
            let m = s.headers.get("x-test-marker").and_then(|v| v.to_str().ok()).unwrap_or_default();
            let Some(&idx) = by_marker.get(m) else {
                panic!("round {round}: the upstream saw {m} but no committed decision exists")
            };
            if s.body.is_empty() {
                continue;
            }
            // Its body's hash is in the log: in the decision if buffered, else in the outcome.
            let want = sha256_hex(&s.body);
            let decision = &entries[idx];
            if s.path == "/events" {
                // A small body: in the decision entry, committed before it was forwarded.
                assert_eq!(
                    decision["body_sha256"],
                    want.as_str(),
                    "round {round}: {m}: a small body the upstream received has no hash in its decision entry"
                );
                assert_eq!(decision["body_len"], s.body.len().to_string().as_str());
                small_checked += 1;
                continue;
            }
            if let Some(h) = decision["body_sha256"].as_str() {
                assert_eq!(h, want, "round {round}: {m}: the decision holds another body's hash");
                buffered_checked += 1;
                continue;
            }
            match outcomes.get(idx.to_string().as_str()) {
                Some(o) => {
                    assert_eq!(o["request_body_sha256"], want.as_str(), "round {round}: {m}: {o}");
                    assert_eq!(o["request_body_len"], s.body.len().to_string().as_str());
                    streamed_checked += 1;
                }
                None => {
                    // Only a request the kill cut off may lack its outcome (written when its
                    // response ends): none its client sent two or more requests later was
                    // answered. (Requests sent after the kill fail at once, so "started" counts
                    // do not say which were in flight; answered ones do.)
                    let (client_round, i) = m.rsplit_once('-').unwrap();
                    let i: u64 = i.parse().unwrap();
                    let last_answered = acknowledged
                        .lock()
                        .unwrap()
                        .keys()
                        .filter_map(|k| k.rsplit_once('-').filter(|(c, _)| *c == client_round))
                        .filter_map(|(_, n)| n.parse::<u64>().ok())
                        .max()
                        .unwrap_or(0);
                    assert!(
                        i + 2 > last_answered,
                        "round {round}: {m} reached the upstream but its body hash is nowhere in the log, though \
                         request {last_answered} of its client was answered after it"
                    );
                    lost_here.insert(m.to_string());
                }
            }
        }
        outcome_lost += lost_here.len();
        for (marker, idx) in acknowledged.lock().unwrap().iter() {
            let e =
                entries.get(*idx as usize).unwrap_or_else(|| panic!("round {round}: record {idx} of {marker} is lost"));
            assert_eq!(
                e["headers"]["x-test-marker"],
                marker.as_str(),
                "round {round}: record {idx} holds another request"
            );
        }
    }
    assert!(acknowledged.lock().unwrap().len() > rounds * 5, "the load was too light to mean anything");
    assert!(
        streamed_checked > rounds && buffered_checked > rounds && small_checked > rounds,
        "too few bodies checked: {streamed_checked} streamed, {buffered_checked} buffered, {small_checked} small \
         ({outcome_lost} cut off)"
    );
}
