//! Audit micro-benchmark: durable appends with N concurrent writers, then `verify` of the result.
//!
//! ```sh
//! cargo run --release --example audit-append -- --writers 32 --seconds 10 --durability sync
//! ```
//!
//! Each writer is a task that appends a realistic `decision` entry and waits for its commit
//! before the next one (as a request waits before it is forwarded). Prints entries/s, the mean
//! group-commit batch and the `verify` rate over the log it wrote.

// A benchmark measures real elapsed time: the clock rule (clippy.toml) is for the gateway.
#![allow(clippy::disallowed_methods)]

use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};
use uapk_gateway::audit::{AuditConfig, AuditLog, Durability, verify_db};

// The gateway's allocator, so the numbers are the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn entry(i: u64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("kind".into(), json!("decision"));
    m.insert("request_id".into(), json!(format!("req-{i:024x}")));
    m.insert("via".into(), json!("proxy"));
    m.insert("agent".into(), json!("payments-agent"));
    m.insert("token".into(), json!({"iss": "platform-issuer", "jti": format!("jti-{:08x}", i % 997)}));
    m.insert("connector".into(), json!("stripe"));
    m.insert("route".into(), json!("refunds.create"));
    m.insert("action".into(), json!("payment.refund"));
    m.insert("params".into(), json!({"amount": "12.34", "currency": "USD", "counterparty": "cus_123"}));
    m.insert("method".into(), json!("POST"));
    m.insert("scheme".into(), json!("https"));
    m.insert("host".into(), json!("api.stripe.com"));
    m.insert("port".into(), json!("443"));
    m.insert("path".into(), json!("/v1/refunds"));
    m.insert("query".into(), Value::Null);
    m.insert("body_sha256".into(), json!("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"));
    m.insert("body_len".into(), json!("42"));
    m.insert("headers".into(), json!({"content-type": "application/json", "user-agent": "agent/1.0"}));
    m.insert("decision".into(), json!("allow"));
    m.insert("reasons".into(), json!([{"code": "all_checks_passed", "message": "all checks passed"}]));
    m.insert("mode".into(), json!("enforce"));
    m
}

fn main() {
    let writers: usize = arg("--writers", "32").parse().expect("--writers N");
    let seconds: f64 = arg("--seconds", "5").parse().expect("--seconds S");
    let durability = match arg("--durability", "sync").as_str() {
        "sync" => Durability::Sync,
        "async" => Durability::Async,
        other => panic!("--durability sync|async, not {other}"),
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let key_path = dir.path().join("gateway.pem");
    uapk_gateway::identity::generate_key_files(&key_path, false).expect("key");
    let key = uapk_gateway::identity::load_signing_key(&key_path).expect("key");
    let db = dir.path().join("audit.redb");
    let log = AuditLog::open(
        AuditConfig {
            path: db.clone(),
            origin: "bench.example/log".into(),
            durability,
            sign_each_entry: false,
            queue_capacity: 8192,
            key_name: "bench.example/log".into(),
        },
        key.clone(),
    )
    .expect("open log");
    let h = log.handle();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let counts: Vec<u64> = rt.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let h = h.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        h.append(entry((w as u64) << 32 | n)).await.expect("append");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("writer"));
        }
        out
    });
    let elapsed = started.elapsed().as_secs_f64();
    let appended: u64 = counts.iter().sum();
    let stats = h.stats();
    drop(rt);
    log.shutdown();
    let commits = stats.commits_total.max(1);
    println!(
        "appends: {appended} entries in {elapsed:.2}s = {:.0} entries/s ({writers} writers, {:?}, {} commits, mean batch {:.1})",
        appended as f64 / elapsed,
        durability,
        commits,
        appended as f64 / commits as f64
    );
    let t = Instant::now();
    let report = verify_db(&db, &[key.verifying_key()]).expect("the log verifies");
    let secs = t.elapsed().as_secs_f64();
    println!("verify: {} entries in {secs:.2}s = {:.0} entries/s", report.entries, report.entries as f64 / secs);
}
