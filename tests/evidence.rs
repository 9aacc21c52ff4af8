//! Evidence that holds up: proofs from the CLI and the admin API, trusted checkpoints against
//! truncation and rollback, foreign re-signing, and the gateway refusing a shortened database.

mod common;

use common::*;
use redb::ReadableTable;
use serde_json::Value;
use std::path::Path;

async fn traffic(gw: &TestGateway, n: usize) {
    let tok = token("pay-agent");
    for i in 0..n {
        let path = if i % 3 == 0 { "/shop/v1/nope".to_string() } else { format!("/shop/v1/charges/c{i}") };
        client().get(gw.base(&path)).header("x-uapk-capability", &tok).send().await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
}

fn cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    run_cli(args, dir)
}

const ADMIN_KEY: &str = "uapk_test_viewer_key";

fn admin_yaml() -> String {
    use sha2::Digest;
    format!(
        "admin:\n  keys:\n    - {{ id: auditor, sha256: {}, role: viewer }}\n",
        hex::encode(sha2::Sha256::digest(ADMIN_KEY))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_trusted_checkpoints_and_tampering() {
    let up = Upstream::start().await;
    let files = [("pay.yaml", manifest("pay-agent", up.addr, "", ""))];
    let gw = TestGateway::start(&files, &admin_yaml()).await;
    traffic(&gw, 12).await;
    // An auditor ships the checkpoint off the host.
    let old_cp = client()
        .get(format!("http://{}/v1/checkpoint", gw.admin))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(old_cp.starts_with("test.example/log\n"), "{old_cp}");
    let old_size: u64 = old_cp.lines().nth(1).unwrap().parse().unwrap();
    // The admin API serves an inclusion proof that verifies offline.
    let proof = client()
        .get(format!("http://{}/v1/proof/inclusion?index=3", gw.admin))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(proof.starts_with("uapk-gateway proof v1\ntype inclusion\nindex 3\n"), "{proof}");
    let dir = gw.stop().await;
    let d = dir.path();
    let data = d.join("data");
    let db = data.join("audit.redb");
    let key = data.join("gateway.pub.pem");
    let (db_s, key_s) = (db.to_str().unwrap().to_string(), key.to_str().unwrap().to_string());
    std::fs::write(d.join("old.cp"), &old_cp).unwrap();
    std::fs::write(d.join("api.proof"), &proof).unwrap();
    let old_copy = d.join("old-copy.redb");
    std::fs::copy(&db, &old_copy).unwrap();
    let (code, out, err) = cli(d, &["verify", "--proof", "api.proof", "--key", &key_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("entry 3 is included"), "{out}");

    // More traffic after the checkpoint was kept.
    let gw = TestGateway::start_in(dir, &files, "").await;
    traffic(&gw, 9).await;
    let dir = gw.stop().await;
    let d = dir.path();
    let (code, out, err) = cli(d, &["verify", "--db", &db_s, "--key", &key_s, "--trusted-checkpoint", "old.cp"]);
    assert_eq!(code, 0, "the log extends the kept checkpoint: {out}{err}");

    // CLI proofs: inclusion of the first entry and consistency old → new verify; edits fail.
    let (code, incl, err) = cli(d, &["proof", "inclusion", "--db", &db_s, "--index", "0"]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(d.join("incl.proof"), &incl).unwrap();
    assert_eq!(cli(d, &["verify", "--proof", "incl.proof", "--key", &key_s]).0, 0);
    let first_path = incl.lines().find(|l| l.starts_with("path ")).unwrap();
    let flipped = first_path.replacen("path 0", "path 1", 1).replacen("path a", "path b", 1);
    let altered = if flipped != first_path {
        incl.replacen(first_path, &flipped, 1)
    } else {
        incl.replacen(first_path, &format!("path {}", "0".repeat(64)), 1)
    };
    std::fs::write(d.join("bad.proof"), altered).unwrap();
    let (code, _, err) = cli(d, &["verify", "--proof", "bad.proof", "--key", &key_s]);
    assert_eq!(code, 1, "an altered proof must fail: {err}");
    let latest: u64 = incl.lines().find_map(|l| l.strip_prefix("size ")).unwrap().parse().unwrap();
    let (code, cons, err) =
        cli(d, &["proof", "consistency", "--db", &db_s, "--old", &old_size.to_string(), "--new", &latest.to_string()]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(d.join("cons.proof"), &cons).unwrap();
    let (code, out, err) =
        cli(d, &["verify", "--proof", "cons.proof", "--key", &key_s, "--trusted-checkpoint", "old.cp"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is a prefix"), "{out}");

    let pristine = std::fs::read(&db).unwrap();
    let restore = || std::fs::write(&db, &pristine).unwrap();
    let newest_cp = {
        let r = redb::ReadOnlyDatabase::open(&db).unwrap();
        let tx = redb::ReadableDatabase::begin_read(&r).unwrap();
        let t = tx.open_table(redb::TableDefinition::<u64, &str>::new("audit_checkpoints")).unwrap();
        t.last().unwrap().unwrap().1.value().to_string()
    };
    std::fs::write(d.join("new.cp"), &newest_cp).unwrap();

    // 1. The file replaced by the older copy: consistent in itself, caught by the kept checkpoint.
    std::fs::copy(&old_copy, &db).unwrap();
    assert_eq!(cli(d, &["verify", "--db", &db_s, "--key", &key_s]).0, 0);
    let (code, _, err) = cli(d, &["verify", "--db", &db_s, "--key", &key_s, "--trusted-checkpoint", "new.cp"]);
    assert_eq!(code, 1);
    assert!(err.contains("truncated or replaced"), "{err}");
    restore();

    // 2. The last K entries dropped together with their checkpoints (a clean truncation).
    {
        let r = redb::Database::open(&db).unwrap();
        let tx = r.begin_write().unwrap();
        {
            let mut e = tx.open_table(redb::TableDefinition::<u64, &[u8]>::new("audit_entries")).unwrap();
            let mut c = tx.open_table(redb::TableDefinition::<u64, &str>::new("audit_checkpoints")).unwrap();
            let keep = old_size + 2;
            for i in keep..latest {
                e.remove(i).unwrap();
            }
            let drop: Vec<u64> = c.range(keep + 1..).unwrap().map(|r| r.unwrap().0.value()).collect();
            for s in drop {
                c.remove(s).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let (code, _, err) = cli(d, &["verify", "--db", &db_s, "--key", &key_s, "--trusted-checkpoint", "new.cp"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("index {}", old_size + 2)) || err.contains("truncated"), "{err}");
    // ...and the gateway itself refuses to start on a database shorter than its checkpoint.
    restore();
    {
        let r = redb::Database::open(&db).unwrap();
        let tx = r.begin_write().unwrap();
        {
            let mut e = tx.open_table(redb::TableDefinition::<u64, &[u8]>::new("audit_entries")).unwrap();
            e.remove(latest - 1).unwrap();
        }
        tx.commit().unwrap();
    }
    let cfg = uapk_gateway::config::load_gateway(Some(&d.join("gateway.yaml"))).unwrap();
    let err = match uapk_gateway::runtime::start(cfg).await {
        Ok(_) => panic!("started on a truncated log"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("truncated"), "{err}");
    restore();

    // 3. Entries rewritten and every checkpoint re-signed with a foreign key.
    {
        use ed25519_dalek::Signer;
        let foreign = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
        let r = redb::Database::open(&db).unwrap();
        let tx = r.begin_write().unwrap();
        {
            let mut c = tx.open_table(redb::TableDefinition::<u64, &str>::new("audit_checkpoints")).unwrap();
            let all: Vec<(u64, String)> = c
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value(), v.value().to_string())
                })
                .collect();
            for (size, note) in all {
                let body = note.split_once("\n\n").unwrap().0.to_string() + "\n";
                let name = "test.example/log";
                let mut blob = uapk_gateway::audit::key_id(name, &foreign.verifying_key()).to_vec();
                blob.extend_from_slice(&foreign.sign(body.as_bytes()).to_bytes());
                use base64::Engine;
                let forged =
                    format!("{body}\n\u{2014} {name} {}\n", base64::engine::general_purpose::STANDARD.encode(blob));
                c.insert(size, forged.as_str()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let (code, _, err) = cli(d, &["verify", "--db", &db_s, "--key", &key_s]);
    assert_eq!(code, 1);
    assert!(err.contains("trusted key"), "{err}");
    restore();
    let (code, out, err) = cli(d, &["verify", "--db", &db_s, "--key", &key_s]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::json!(out);
    assert!(v.as_str().unwrap().starts_with("ok:"));
}
