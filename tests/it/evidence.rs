//! Evidence that holds up: proofs from the CLI and the admin API, trusted checkpoints against
//! truncation and rollback, foreign re-signing, and the gateway refusing a shortened database.

use crate::support::*;
use serde_json::Value;
use std::path::Path;

async fn traffic(gw: &TestGateway, n: usize) {
    let tok = token("pay-agent");
    for i in 0..n {
        let path = if i % 3 == 0 { "/shop/v1/nope".to_string() } else { format!("/shop/v1/charges/c{i}") };
        gw.get(&path, &tok).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
}

const ADMIN_KEY: &str = "uapk_test_viewer_key";

fn admin_yaml() -> String {
    admin_keys(&[("auditor", ADMIN_KEY, "viewer")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_trusted_checkpoints_and_tampering() {
    let up = Upstream::start().await;
    let files = [("pay.yaml", manifest("pay-agent", up.addr, "", ""))];
    let gw = TestGateway::start(&files, &admin_yaml()).await;
    traffic(&gw, 12).await;
    // An auditor ships the checkpoint off the host.
    let old_cp = fetch_checkpoint(&gw).await;
    assert!(old_cp.starts_with("test.example/log\n"), "{old_cp}");
    let old_size: u64 = old_cp.lines().nth(1).unwrap().parse().unwrap();
    // The admin API serves an inclusion proof that verifies offline.
    let proof = client()
        .get(gw.admin_url("/v1/proof/inclusion?index=3"))
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
    let (code, out, err) = run_cli(&["verify", "--proof", "api.proof", "--key", &key_s], d);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("entry 3 is included"), "{out}");

    // More traffic after the checkpoint was kept.
    let gw = TestGateway::start_in(dir, &files, "").await;
    traffic(&gw, 9).await;
    let dir = gw.stop().await;
    let d = dir.path();
    let (code, out, err) = run_cli(&["verify", "--db", &db_s, "--key", &key_s, "--trusted-checkpoint", "old.cp"], d);
    assert_eq!(code, 0, "the log extends the kept checkpoint: {out}{err}");

    // CLI proofs: inclusion of the first entry and consistency old → new verify; edits fail.
    let (code, incl, err) = run_cli(&["proof", "inclusion", "--db", &db_s, "--index", "0"], d);
    assert_eq!(code, 0, "{err}");
    std::fs::write(d.join("incl.proof"), &incl).unwrap();
    assert_eq!(run_cli(&["verify", "--proof", "incl.proof", "--key", &key_s], d).0, 0);
    let first_path = incl.lines().find(|l| l.starts_with("path ")).unwrap();
    let flipped = first_path.replacen("path 0", "path 1", 1).replacen("path a", "path b", 1);
    let altered = if flipped != first_path {
        incl.replacen(first_path, &flipped, 1)
    } else {
        incl.replacen(first_path, &format!("path {}", "0".repeat(64)), 1)
    };
    std::fs::write(d.join("bad.proof"), altered).unwrap();
    let (code, _, err) = run_cli(&["verify", "--proof", "bad.proof", "--key", &key_s], d);
    assert_eq!(code, 1, "an altered proof must fail: {err}");
    let latest: u64 = incl.lines().find_map(|l| l.strip_prefix("size ")).unwrap().parse().unwrap();
    let (code, cons, err) = run_cli(
        &["proof", "consistency", "--db", &db_s, "--old", &old_size.to_string(), "--new", &latest.to_string()],
        d,
    );
    assert_eq!(code, 0, "{err}");
    std::fs::write(d.join("cons.proof"), &cons).unwrap();
    let (code, out, err) =
        run_cli(&["verify", "--proof", "cons.proof", "--key", &key_s, "--trusted-checkpoint", "old.cp"], d);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is a prefix"), "{out}");

    let pristine = std::fs::read(&db).unwrap();
    let restore = || std::fs::write(&db, &pristine).unwrap();
    let newest_cp = newest_checkpoint(&db);
    std::fs::write(d.join("new.cp"), &newest_cp).unwrap();

    // 1. The file replaced by the older copy: consistent in itself, caught by the kept checkpoint.
    std::fs::copy(&old_copy, &db).unwrap();
    assert_eq!(run_cli(&["verify", "--db", &db_s, "--key", &key_s], d).0, 0);
    let (code, _, err) = run_cli(&["verify", "--db", &db_s, "--key", &key_s, "--trusted-checkpoint", "new.cp"], d);
    assert_eq!(code, 1);
    assert!(err.contains("replaced by an older copy"), "{err}");
    restore();

    // 2. The last K entries dropped together with their checkpoints (a clean truncation).
    tamper(&db, |t| {
        let keep = old_size + 2;
        for i in keep..latest {
            t.remove_entry(i);
        }
        for (size, _) in t.checkpoints().into_iter().filter(|(size, _)| *size > keep) {
            t.remove_checkpoint(size);
        }
    });
    let (code, _, err) = run_cli(&["verify", "--db", &db_s, "--key", &key_s, "--trusted-checkpoint", "new.cp"], d);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("index {}", old_size + 2)) || err.contains("truncated"), "{err}");
    // ...and the gateway itself refuses to start on a database shorter than its checkpoint.
    restore();
    tamper(&db, |t| t.remove_entry(latest - 1));
    let cfg = uapk_gateway::config::load_gateway(Some(&d.join("gateway.yaml"))).unwrap();
    let err = match uapk_gateway::runtime::start(cfg).await {
        Ok(_) => panic!("started on a truncated log"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("truncated"), "{err}");
    restore();

    // 3. Entries rewritten and every checkpoint re-signed with a foreign key.
    tamper(&db, |t| {
        use ed25519_dalek::Signer;
        let foreign = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
        for (size, note) in t.checkpoints() {
            let body = note.split_once("\n\n").unwrap().0.to_string() + "\n";
            let name = "test.example/log";
            let mut blob = uapk_gateway::audit::key_id(name, &foreign.verifying_key()).to_vec();
            blob.extend_from_slice(&foreign.sign(body.as_bytes()).to_bytes());
            use base64::Engine;
            let forged =
                format!("{body}\n\u{2014} {name} {}\n", base64::engine::general_purpose::STANDARD.encode(blob));
            t.put_checkpoint(size, &forged);
        }
    });
    let (code, _, err) = run_cli(&["verify", "--db", &db_s, "--key", &key_s], d);
    assert_eq!(code, 1);
    assert!(err.contains("trusted key"), "{err}");
    restore();
    let (code, out, err) = run_cli(&["verify", "--db", &db_s, "--key", &key_s], d);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::json!(out);
    assert!(v.as_str().unwrap().starts_with("ok:"));
}

/// Signs a checkpoint body the way the gateway does, with any key (to forge or to fork).
fn sign_checkpoint(origin: &str, size: u64, root: [u8; 32], key: &ed25519_dalek::SigningKey) -> String {
    uapk_gateway::audit::Checkpoint { origin: origin.into(), size, root }.sign(origin, key)
}

/// Rewrites a bundle's manifest for its current files and signs it with `key`, as someone
/// holding `key` would after editing the bundle.
fn resign_manifest(bundle: &Path, key: &ed25519_dalek::SigningKey) {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let mut m: Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    for name in ["checkpoint", "entries.jsonl", "prefix.json", "gateway.pub.pem"] {
        let h = sha256_hex(std::fs::read(bundle.join(name)).unwrap());
        m["files"][name] = Value::String(h);
    }
    let mut bytes = serde_json::to_vec_pretty(&m).unwrap();
    bytes.push(b'\n');
    std::fs::write(bundle.join("manifest.json"), &bytes).unwrap();
    let sig = key.sign(&[uapk_gateway::audit::MANIFEST_CONTEXT, &bytes].concat());
    let b64 = base64::engine::general_purpose::STANDARD.encode(sig.to_bytes());
    std::fs::write(bundle.join("manifest.json.sig"), format!("{b64}\n")).unwrap();
}

async fn fetch_checkpoint(gw: &TestGateway) -> String {
    client().get(gw.admin_url("/v1/checkpoint")).bearer_auth(ADMIN_KEY).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_checked_against_the_key_and_the_trusted_checkpoint() {
    use std::os::unix::fs::PermissionsExt;
    let up = Upstream::start().await;
    let files = [("pay.yaml", manifest("pay-agent", up.addr, "", ""))];
    let gw = TestGateway::start(&files, &admin_yaml()).await;
    traffic(&gw, 6).await;
    let old_cp = fetch_checkpoint(&gw).await;
    let old_size: u64 = old_cp.lines().nth(1).unwrap().parse().unwrap();
    traffic(&gw, 9).await;
    let d = gw.dir.path().to_path_buf();
    let cfg = gw.config_path.to_str().unwrap().to_string();
    let db_s = gw.db_path().to_str().unwrap().to_string();
    let key_s = gw.data().join("gateway.pub.pem").to_str().unwrap().to_string();

    // Data files are the owner's alone.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&gw.data()), 0o700, "data directory");
    for f in ["audit.redb", "gateway.pem", "ca-key.pem"] {
        assert_eq!(mode(&gw.data().join(f)), 0o600, "{f}");
    }

    // The running gateway holds the database: verify, export and proof say so and exit 2, not
    // 1 (nothing was found wrong; nothing was verified).
    let (code, out, err) = run_cli(&["verify", "--db", &db_s, "--key", &key_s], &d);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("running gateway") && !out.contains("ok"), "{err}");
    let (code, _, err) = run_cli(&["export", "-c", &cfg, "--out", "live-bundle"], &d);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("running gateway"), "{err}");
    let (code, _, err) = run_cli(&["proof", "inclusion", "--db", &db_s, "--index", "0"], &d);
    assert_eq!(code, 2, "{err}");

    let dir = gw.stop().await;
    let d = dir.path();
    let signer = uapk_gateway::identity::load_signing_key(&d.join("data/gateway.pem")).unwrap();
    let newest = newest_checkpoint(&d.join("data/audit.redb"));
    let new_size: u64 = newest.lines().nth(1).unwrap().parse().unwrap();
    std::fs::write(d.join("old.cp"), &old_cp).unwrap();
    std::fs::write(d.join("new.cp"), &newest).unwrap();

    // Export finds the log and the signing key through the config.
    let (code, out, err) = run_cli(&["export", "-c", &cfg, "--out", "bundle"], d);
    assert_eq!(code, 0, "{out}{err}");
    let bundle = d.join("bundle");
    let b = bundle.to_str().unwrap();

    // --bundle and --proof without --key: exit 2, never the bundle's own key.
    let (code, out, err) = run_cli(&["verify", "--bundle", b], d);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--key") && out.is_empty(), "{err}");
    std::fs::write(d.join("p.proof"), "uapk-gateway proof v1\n").unwrap();
    let (code, _, err) = run_cli(&["verify", "--proof", "p.proof"], d);
    assert_eq!(code, 2, "{err}");

    let (code, out, err) = run_cli(&["verify", "--bundle", b, "--key", &key_s], d);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no trusted checkpoint given"), "{out}");
    let (code, out, err) = run_cli(&["verify", "--bundle", b, "--key", &key_s, "--trusted-checkpoint", "old.cp"], d);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("extends the trusted checkpoint of size {old_size}")), "{out}");
    let (code, out, err) = run_cli(&["verify", "--bundle", b, "--key", &key_s, "--trusted-checkpoint", "new.cp"], d);
    assert_eq!(code, 0, "{out}{err}");

    let bundle_fails = |trusted: &str, text: &str, why: &str| {
        std::fs::write(d.join("t.cp"), text).unwrap();
        let (code, out, err) = run_cli(&["verify", "--bundle", b, "--key", &key_s, "--trusted-checkpoint", "t.cp"], d);
        assert_eq!(code, 1, "{trusted}: {out}{err}");
        assert!(err.contains(why) && !out.contains("ok"), "{trusted}: {err}");
        // The same checkpoint against the database: the same verdict.
        let (code, _, err) = run_cli(&["verify", "--db", &db_s, "--key", &key_s, "--trusted-checkpoint", "t.cp"], d);
        assert_eq!(code, 1, "{trusted} (--db): {err}");
    };
    bundle_fails("garbage", "not a checkpoint at all\n", "trusted checkpoint");
    bundle_fails("no final newline", newest.strip_suffix('\n').unwrap(), "newline");
    let root: [u8; 32] = {
        use base64::Engine;
        let line = newest.lines().nth(2).unwrap();
        base64::engine::general_purpose::STANDARD.decode(line).unwrap().try_into().unwrap()
    };
    let foreign = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    bundle_fails(
        "forged larger tree",
        &sign_checkpoint("test.example/log", new_size + 50, root, &foreign),
        "no signature by a trusted key",
    );
    bundle_fails(
        "larger tree signed by the gateway (rollback)",
        &sign_checkpoint("test.example/log", new_size + 50, root, &signer),
        "rolled back",
    );
    bundle_fails(
        "same size, another root (fork)",
        &sign_checkpoint("test.example/log", old_size, [7u8; 32], &signer),
        "not an extension",
    );
    bundle_fails("another log", &sign_checkpoint("other.example/log", old_size, root, &signer), "not of log");

    // A bundle rolled back to the old size (a genuine, older export) against the newer checkpoint.
    let (code, _, err) = run_cli(&["export", "-c", &cfg, "--out", "old-bundle", "--to", &old_size.to_string()], d);
    assert_eq!(code, 0, "{err}");
    let ob = d.join("old-bundle");
    let ob = ob.to_str().unwrap();
    assert_eq!(run_cli(&["verify", "--bundle", ob, "--key", &key_s], d).0, 0);
    let (code, _, err) = run_cli(&["verify", "--bundle", ob, "--key", &key_s, "--trusted-checkpoint", "new.cp"], d);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("rolled back") && err.contains(&format!("index {old_size}")), "{err}");

    // A bundle starting after the trusted size cannot be checked against it: not ok.
    let (code, _, err) =
        run_cli(&["export", "-c", &cfg, "--out", "tail-bundle", "--from", &(old_size + 1).to_string()], d);
    assert_eq!(code, 0, "{err}");
    let tb = d.join("tail-bundle");
    let (code, _, err) =
        run_cli(&["verify", "--bundle", tb.to_str().unwrap(), "--key", &key_s, "--trusted-checkpoint", "old.cp"], d);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot be checked"), "{err}");

    // Re-signed by an attacker: an entry edited, checkpoint and manifest signed with their key
    // and their public key put in the bundle. Caught with --key.
    let forged = d.join("forged");
    copy_dir(&bundle, &forged);
    // The last entry's time moved back a thousand years (no later entry links to it).
    let text = std::fs::read_to_string(forged.join("entries.jsonl")).unwrap();
    let (head, last) = text.trim_end().rsplit_once('\n').unwrap();
    let edited = format!("{head}\n{}\n", last.replacen("\"ts\":\"2", "\"ts\":\"1", 1));
    assert_ne!(edited, text);
    std::fs::write(forged.join("entries.jsonl"), &edited).unwrap();
    let mut tree = uapk_gateway::audit::Frontier::new();
    for line in edited.lines() {
        tree.push(uapk_gateway::audit::leaf_hash(line.as_bytes()));
    }
    std::fs::write(forged.join("checkpoint"), sign_checkpoint("test.example/log", tree.size(), tree.root(), &foreign))
        .unwrap();
    std::fs::write(forged.join("gateway.pub.pem"), uapk_gateway::identity::verifying_key_pem(&foreign.verifying_key()))
        .unwrap();
    resign_manifest(&forged, &foreign);
    let fb = forged.to_str().unwrap();
    let (code, out, err) = run_cli(&["verify", "--bundle", fb, "--key", &key_s], d);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("trusted key"), "{err}");
    let foreign_pub = forged.join("gateway.pub.pem");
    // (With the attacker's own key it is self-consistent: that is why --key is required.)
    assert_eq!(run_cli(&["verify", "--bundle", fb, "--key", foreign_pub.to_str().unwrap()], d).0, 0);

    // An edited entry with the manifest re-signed by the real key (an insider with the key but
    // not the history) is still caught by the signed checkpoint.
    let edited_dir = d.join("edited");
    copy_dir(&bundle, &edited_dir);
    std::fs::write(edited_dir.join("entries.jsonl"), &edited).unwrap();
    resign_manifest(&edited_dir, &signer);
    let (code, _, err) = run_cli(&["verify", "--bundle", edited_dir.to_str().unwrap(), "--key", &key_s], d);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("do not hash to the signed checkpoint"), "{err}");

    // A manifest signature made without the manifest context (e.g. a bare signature of its
    // bytes) does not verify.
    let bare = d.join("bare");
    copy_dir(&bundle, &bare);
    {
        use base64::Engine;
        use ed25519_dalek::Signer;
        let sig = signer.sign(&std::fs::read(bare.join("manifest.json")).unwrap());
        let b64 = base64::engine::general_purpose::STANDARD.encode(sig.to_bytes());
        std::fs::write(bare.join("manifest.json.sig"), format!("{b64}\n")).unwrap();
    }
    let (code, _, err) = run_cli(&["verify", "--bundle", bare.to_str().unwrap(), "--key", &key_s], d);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("manifest.json is not signed"), "{err}");

    // I/O: no such bundle, no such database: exit 2.
    assert_eq!(run_cli(&["verify", "--bundle", "nowhere", "--key", &key_s], d).0, 2);
    assert_eq!(run_cli(&["verify", "--db", "nowhere.redb", "--key", &key_s], d).0, 2);
}

#[test]
fn keys_are_pkcs8_v1_that_openssl_and_python_load() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("keys/k.pem");
    let (code, out, err) = run_cli(&["keygen", "--out", key.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(dir.path().join("keys")).unwrap().permissions().mode() & 0o777, 0o700);
    let pem = std::fs::read_to_string(&key).unwrap();
    // RFC 8410 v1: SEQUENCE { INTEGER 0, AlgorithmIdentifier Ed25519, OCTET STRING seed }, 48 bytes.
    use base64::Engine;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    assert_eq!(der.len(), 48, "{pem}");
    assert_eq!(&der[..16], &hex::decode("302e020100300506032b657004220420").unwrap()[..]);
    let o = std::process::Command::new("openssl").args(["pkey", "-in", key.to_str().unwrap(), "-noout"]).output();
    let o = o.expect("openssl is installed (.ci/run installs it)");
    assert!(o.status.success(), "openssl: {}", String::from_utf8_lossy(&o.stderr));
    let py = "import sys\nfrom cryptography.hazmat.primitives.serialization import load_pem_private_key\nk = load_pem_private_key(open(sys.argv[1], 'rb').read(), None)\nprint(type(k).__name__)";
    let o = std::process::Command::new("python3").args(["-c", py, key.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "cryptography: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Ed25519PrivateKey"));
    // The key it wrote signs tokens (it is read back), and a v2 key (with its public key) is
    // still read.
    let v2 = dir.path().join("v2.pem");
    let sk = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    std::fs::write(&v2, sk.to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF).unwrap().as_bytes())
        .unwrap();
    assert_eq!(uapk_gateway::identity::load_signing_key(&v2).unwrap().to_bytes(), sk.to_bytes());
    assert!(uapk_gateway::identity::load_signing_key(&key).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_c2sp_key_name_rules_are_refused_by_check_and_run() {
    for (what, origin) in [
        ("plus", "\"log+1\""),
        ("space", "\"my log\""),
        ("tab", "\"my\\tlog\""),
        ("no-break space", "\"my\\u00a0log\""),
        ("em space", "\"my\\u2003log\""),
        ("non-ASCII", "\"journal-é\""),
        ("empty", "\"\""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let yaml = format!(
            "listeners:\n  proxy: 127.0.0.1:0\n  admin: 127.0.0.1:0\npolicies: {}\ndata_dir: {}\naudit:\n  origin: {origin}\n",
            policies.display(),
            dir.path().join("data").display()
        );
        let cfg = dir.path().join("gateway.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let (code, out, err) = run_cli(&["check", "-c", cfg.to_str().unwrap()], dir.path());
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert!(err.contains(&format!("{}:7:", cfg.display())) && err.contains("audit.origin"), "{what}: {err}");
        let (code, _, err) = run_cli(&["run", "-c", cfg.to_str().unwrap()], dir.path());
        assert_eq!(code, 1, "{what}: run must refuse: {err}");
        assert!(err.contains("audit.origin"), "{what}: {err}");
        assert!(!dir.path().join("data/audit.redb").exists(), "{what}: run created a log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_gateways_log_is_verified_exported_and_proved_through_the_admin_api() {
    const ADMIN: &str = "uapk_test_admin_key";
    let up = Upstream::start().await;
    let files = [("pay.yaml", manifest("pay-agent", up.addr, "", ""))];
    let yaml = admin_keys(&[("auditor", ADMIN_KEY, "viewer"), ("ops", ADMIN, "admin")]);
    let gw = TestGateway::start(&files, &yaml).await;
    traffic(&gw, 6).await;
    let kept = fetch_checkpoint(&gw).await;
    let kept_size: u64 = kept.lines().nth(1).unwrap().parse().unwrap();
    traffic(&gw, 6).await;
    let d = gw.dir.path().to_path_buf();
    std::fs::write(d.join("kept.cp"), &kept).unwrap();
    let url = gw.admin_url("");
    let key_s = gw.data().join("gateway.pub.pem").to_str().unwrap().to_string();

    // The API: 401 without a key, 403 for a viewer, a tar for an admin.
    let post = |key: Option<&str>| {
        let mut r = client().post(format!("{url}/v1/export"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 401);
    assert_eq!(post(Some(ADMIN_KEY)).await.unwrap().status(), 403);
    let resp = post(Some(ADMIN)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-tar");
    let tar = resp.bytes().await.unwrap();
    let names = uapk_gateway::audit::tar::extract(&tar, &d.join("api-bundle")).unwrap();
    assert_eq!(names.len(), 6, "{names:?}");

    // While requests keep arriving, the CLI verifies, proves and exports the live log.
    let busy = {
        let base = gw.base("/shop/v1/charges/live");
        let tok = token("pay-agent");
        tokio::spawn(async move {
            for _ in 0..40 {
                let _ = client().get(&base).header("x-uapk-capability", &tok).send().await;
            }
        })
    };
    let dd = d.clone();
    let (url2, key2) = (url.clone(), key_s.clone());
    let results = tokio::task::spawn_blocking(move || {
        let d = dd.as_path();
        let verify = run_cli_with(
            &["verify", "--admin", &url2, "--key", &key2, "--trusted-checkpoint", "kept.cp"],
            d,
            &[("UAPK_ADMIN_KEY", ADMIN_KEY)],
        );
        let proof = run_cli_with(
            &["proof", "inclusion", "--admin", &url2, "--index", "2"],
            d,
            &[("UAPK_ADMIN_KEY", ADMIN_KEY)],
        );
        let viewer_export =
            run_cli_with(&["export", "--admin", &url2, "--out", "viewer-bundle"], d, &[("UAPK_ADMIN_KEY", ADMIN_KEY)]);
        let export =
            run_cli_with(&["export", "--admin", &url2, "--out", "live-bundle"], d, &[("UAPK_ADMIN_KEY", ADMIN)]);
        let no_key = run_cli(&["verify", "--admin", &url2, "--key", &key2], d);
        let wrong_key =
            run_cli_with(&["verify", "--admin", &url2, "--key", &key2], d, &[("UAPK_ADMIN_KEY", "uapk_wrong")]);
        (verify, proof, viewer_export, export, no_key, wrong_key)
    })
    .await
    .unwrap();
    busy.await.unwrap();
    let (verify, proof, viewer_export, export, no_key, wrong_key) = results;
    assert_eq!(verify.0, 0, "{verify:?}");
    assert!(verify.1.contains(&format!("extends the trusted checkpoint of size {kept_size}")), "{verify:?}");
    assert_eq!(proof.0, 0, "{proof:?}");
    assert!(proof.1.starts_with("uapk-gateway proof v1\ntype inclusion\nindex 2\n"), "{proof:?}");
    assert_eq!(viewer_export.0, 2, "{viewer_export:?}");
    assert!(viewer_export.2.contains("refused the key"), "{viewer_export:?}");
    assert_eq!(export.0, 0, "{export:?}");
    assert_eq!(no_key.0, 2, "{no_key:?}");
    assert!(no_key.2.contains("UAPK_ADMIN_KEY"), "{no_key:?}");
    assert_eq!(wrong_key.0, 2, "{wrong_key:?}");
    assert!(!wrong_key.2.contains("uapk_wrong"), "the key is never echoed: {wrong_key:?}");
    std::fs::write(d.join("live.proof"), &proof.1).unwrap();
    let (code, out, err) = run_cli(&["verify", "--proof", "live.proof", "--key", &key_s], &d);
    assert_eq!(code, 0, "{out}{err}");

    // Both exported bundles verify offline, against the kept checkpoint too.
    for b in ["api-bundle", "live-bundle"] {
        let p = d.join(b);
        let (code, out, err) = run_cli(
            &["verify", "--bundle", p.to_str().unwrap(), "--key", &key_s, "--trusted-checkpoint", "kept.cp"],
            &d,
        );
        assert_eq!(code, 0, "{b}: {out}{err}");
    }
    // A tampered served checkpoint is not "ok": the kept checkpoint of a larger tree signed by
    // the gateway key but with another root fails the live verification.
    let signer = uapk_gateway::identity::load_signing_key(&gw.data().join("gateway.pem")).unwrap();
    std::fs::write(d.join("fork.cp"), sign_checkpoint("test.example/log", kept_size, [1u8; 32], &signer)).unwrap();
    let url3 = url.clone();
    let dd = d.clone();
    let k3 = key_s.clone();
    let fork = tokio::task::spawn_blocking(move || {
        run_cli_with(
            &["verify", "--admin", &url3, "--key", &k3, "--trusted-checkpoint", "fork.cp"],
            &dd,
            &[("UAPK_ADMIN_KEY", ADMIN_KEY)],
        )
    })
    .await
    .unwrap();
    assert_eq!(fork.0, 1, "{fork:?}");
    assert!(fork.2.contains("not an extension"), "{fork:?}");
    gw.stop().await;
}
