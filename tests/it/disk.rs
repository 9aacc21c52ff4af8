//! A full disk under the audit log: the gateway answers 503 `audit_unavailable` and forwards
//! nothing it could not record, keeps serving its admin listener, loses no acknowledged entry,
//! says so on `/readyz` and in `uapk_audit_writable`, and records again by itself once space is
//! back (the writer reopens the log, no restart); `verify` passes.
//!
//! Mounts a small tmpfs as the data directory, so it needs root (CI runs as root).

use crate::support::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    // Whatever is left is smaller than a chunk: take it in 512-byte pieces.
    while f.write_all(&chunk[..512]).is_ok() {}
    let _ = f.sync_all();
    path
}

const VIEWER: &str = "uapk_disk_viewer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_503_forwards_nothing_unrecorded_and_loses_nothing() {
    full_disk("sync").await;
}

/// With `durability: async` requests are forwarded before their entries are fsynced, so a
/// failed fsync can lose some (as a crash would); the log must still verify and recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_async_durability_refuses_recovers_and_verifies() {
    full_disk("async").await;
}

async fn full_disk(durability: &str) {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let ok = Command::new("mount").args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"]).arg(&data).status().unwrap();
    assert!(ok.success(), "mount tmpfs");
    let _mount = Mount(data.clone());

    let manifests = [("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))];
    let policies = dir.path().join("policies");
    let config = format!(
        "listeners: {{ proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: {}\ndata_dir: {}\n\
         audit: {{ origin: test.example/log, durability: {durability} }}\n\
         network: {{ allow_private_destinations: [127.0.0.0/8] }}\nlog_format: text\n{}",
        policies.display(),
        data.display(),
        admin_keys(&[("audit", VIEWER, "viewer")])
    );
    std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
    let gw = TestGateway::start_in(dir, &manifests, "").await;
    let tok = token("pay-agent");
    assert_eq!(gw.get("/shop/v1/charges/ok?before=1", &tok).await.status(), 200);

    let filler = fill(&data);
    // Large entries (an 8 KiB query each) use up the log's free pages quickly.
    let pad = "x".repeat(8 * 1024);
    let (mut allowed, mut refused) = (0usize, 0usize);
    for i in 0..3000 {
        let r = gw.get(&format!("/shop/v1/charges/ok?i={i}&pad={pad}"), &tok).await;
        match r.status().as_u16() {
            200 => allowed += 1,
            503 => {
                let body = r.text().await.unwrap();
                assert!(body.contains("audit_unavailable"), "{body}");
                assert!(!body.contains(&tok), "the token leaked into the refusal");
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(refused >= 3, "the disk never filled up ({allowed} requests recorded)");
    // Only recorded requests reached the upstream: the first one, and every 200 since.
    if durability == "sync" {
        assert_eq!(up.count(), 1 + allowed, "a request was forwarded without its record");
    }
    // The admin listener still answers, and says the log cannot write.
    let live = client().get(gw.admin_url("/livez")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 503, "readyz stays ready while the log cannot write");
    assert_eq!(body["audit_writable"], false, "{body}");
    assert!(gw.metrics().await.contains("\nuapk_audit_writable 0\n"));

    // Space comes back: the writer reopens the log by itself and records again, no restart.
    std::fs::remove_file(&filler).unwrap();
    let mut recovered_after = None;
    for attempt in 0..100 {
        let r = gw.get(&format!("/shop/v1/charges/ok?after={attempt}"), &tok).await;
        match r.status().as_u16() {
            200 => {
                let idx = record_of(&r);
                recovered_after = Some((attempt, idx));
                break;
            }
            503 => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            s => panic!("unexpected status {s} after space came back"),
        }
    }
    let (attempts, idx) = recovered_after.expect("the gateway did not record again within 10 s of space coming back");
    if durability == "sync" {
        assert_eq!(up.count(), 2 + allowed, "a request was forwarded without its record");
    }
    assert_eq!(gw.readyz().await.0, 200, "readyz did not come back");
    assert!(gw.metrics().await.contains("\nuapk_audit_writable 1\n"));
    // The record the client was told about is its request.
    let rec = client().get(gw.admin_url(&format!("/v1/records/{idx}"))).bearer_auth(VIEWER).send().await.unwrap();
    assert_eq!(rec.status(), 200);
    let rec: serde_json::Value = rec.json().await.unwrap();
    assert_eq!(rec["query"], format!("after={attempts}"), "{rec}");
    eprintln!(
        "full disk ({durability}): {allowed} recorded after filling, {refused} refused; recorded again after {attempts} retries"
    );
    let db = gw.db_path();
    let dir = gw.stop().await;
    let (code, out, err) = run_cli(
        &["verify", "--db", db.to_str().unwrap(), "--key", data.join("gateway.pub.pem").to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(code, 0, "verify failed: {out}{err}");
    drop(dir);
}
