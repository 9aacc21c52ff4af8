//! Large logs (run by hand; numbers go in the README):
//!
//! ```sh
//! cargo test --release --test it large_log:: -- --ignored --nocapture
//! UAPK_LARGE_ENTRIES=1000000 cargo test --release --test it large_log:: -- --ignored --nocapture
//! ```
//!
//! Fills a log with realistic decision entries through the real writer, then times `verify` and
//! `export` of the whole log from the real binary, and reports their rate and peak memory.

use crate::support::*;
use serde_json::{Map, json};
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes of work: run by hand with --ignored"]
async fn verify_and_export_a_large_log() {
    use uapk_gateway::audit::{AuditConfig, AuditLog, Durability};
    let n: u64 = std::env::var("UAPK_LARGE_ENTRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("gateway.pem");
    uapk_gateway::identity::generate_key_files(&key_path, false).unwrap();
    let key = uapk_gateway::identity::load_signing_key(&key_path).unwrap();
    let db = dir.path().join("audit.redb");
    let log = AuditLog::open(
        AuditConfig {
            path: db.clone(),
            origin: "large.test/log".into(),
            durability: Durability::Async,
            sign_each_entry: false,
            queue_capacity: 65_536,
            key_name: "large.test/log".into(),
        },
        key,
    )
    .unwrap();
    let h = log.handle();
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..n {
        let mut m = Map::new();
        m.insert("kind".into(), json!("decision"));
        m.insert("request_id".into(), json!(format!("{i:016x}")));
        m.insert("agent".into(), json!("payments-agent"));
        m.insert("connector".into(), json!("stripe"));
        m.insert("action".into(), json!("payment.refund"));
        m.insert("params".into(), json!({"amount": "12.34", "currency": "USD", "counterparty": "cus_123"}));
        m.insert("method".into(), json!("POST"));
        m.insert("path".into(), json!("/v1/refunds"));
        m.insert("decision".into(), json!("allow"));
        m.insert("reasons".into(), json!([{"code": "all_checks_passed", "message": "all checks passed"}]));
        let h = h.clone();
        pending.push(tokio::spawn(async move { h.append(m).await }));
        if pending.len() >= 4096 {
            for p in pending.drain(..) {
                p.await.unwrap().unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
    let fill = started.elapsed();
    tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
    let size = std::fs::metadata(&db).unwrap().len();
    println!(
        "filled {n} entries in {:.1}s ({:.0}/s), file {} MB",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64(),
        size / 1_000_000
    );
    let pubkey = dir.path().join("gateway.pub.pem");
    let time = |args: &[&str]| {
        let t = Instant::now();
        let out =
            std::process::Command::new("/usr/bin/time").arg("-f").arg("%M").arg(bin()).args(args).output().unwrap();
        let secs = t.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let rss_kb: u64 = stderr.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        assert!(out.status.success(), "{}{stderr}", String::from_utf8_lossy(&out.stdout));
        (secs, rss_kb / 1024)
    };
    let (secs, rss) = time(&["verify", "--db", db.to_str().unwrap(), "--key", pubkey.to_str().unwrap()]);
    println!("verify: {n} entries in {secs:.2}s = {:.0} entries/s, peak RSS {rss} MB", n as f64 / secs);
    let out = dir.path().join("bundle");
    let (secs, rss) = time(&[
        "export",
        "--db",
        db.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--gateway-key",
        key_path.to_str().unwrap(),
    ]);
    println!("export: {n} entries in {secs:.2}s = {:.0} entries/s, peak RSS {rss} MB", n as f64 / secs);
    let (secs, rss) = time(&["verify", "--bundle", out.to_str().unwrap(), "--key", pubkey.to_str().unwrap()]);
    println!("verify --bundle: {secs:.2}s = {:.0} entries/s, peak RSS {rss} MB", n as f64 / secs);

    // Proofs over the whole log read the proof index and a few hundred entries per level of the
    // path: memory for one path, not for n leaves.
    let run = |args: &[&str], file: &str| {
        let t = Instant::now();
        let out =
            std::process::Command::new("/usr/bin/time").arg("-f").arg("%M").arg(bin()).args(args).output().unwrap();
        let secs = t.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let rss_kb: u64 = stderr.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        std::fs::write(dir.path().join(file), &out.stdout).unwrap();
        (secs, rss_kb / 1024)
    };
    let db_s = db.to_str().unwrap();
    let (mid, third) = ((n / 2).to_string(), (n / 3).max(1).to_string());
    let (secs, rss) = run(&["proof", "inclusion", "--db", db_s, "--index", &mid], "incl.proof");
    println!("proof inclusion (index {mid} of {n}): {secs:.2}s, peak RSS {rss} MB");
    let (secs, rss) =
        run(&["proof", "consistency", "--db", db_s, "--old", &third, "--new", &n.to_string()], "cons.proof");
    println!("proof consistency ({third} -> {n}): {secs:.2}s, peak RSS {rss} MB");
    for file in ["incl.proof", "cons.proof"] {
        let path = dir.path().join(file);
        let args = ["verify", "--proof", path.to_str().unwrap(), "--key", pubkey.to_str().unwrap()];
        let out = std::process::Command::new(bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
