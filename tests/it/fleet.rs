//! A fleet (SPEC §15): three gateway processes of the real binary on one private PostgreSQL
//! cluster (started here with `initdb` on a free loopback port, as the `postgres` user when run
//! as root). One budget, one approvals queue and one log for all of them; an outage refuses
//! traffic and heals by itself. Without the PostgreSQL binaries the tests say which package to
//! install and pass, except with `CI` set, where they fail.

use crate::support::postgres::Pg;
use crate::support::redis::RedisServer;
use crate::support::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const APPROVER: &str = "uapk_fleet_approver";

/// N gateway processes sharing one policy directory, one key and one database.
struct Fleet {
    dir: tempfile::TempDir,
    gateways: Vec<Gw>,
}

struct Gw {
    proxy: u16,
    admin: u16,
    config: PathBuf,
    child: Option<Child>,
    name: String,
}

impl Fleet {
    async fn start(pg: &Pg, n: usize, manifests: &[(&str, String)]) -> Fleet {
        Fleet::start_with(pg, n, manifests, "").await
    }

    /// `start`, with `extra` appended to every gateway's `gateway.yaml`.
    async fn start_with(pg: &Pg, n: usize, manifests: &[(&str, String)], extra: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("policies")).unwrap();
        for (name, text) in manifests {
            std::fs::write(d.join("policies").join(name), text).unwrap();
        }
        let key = d.join("gateway.pem");
        let (code, _, err) = run_cli(&["keygen", "--out", key.to_str().unwrap()], d);
        assert_eq!(code, 0, "{err}");
        let mut gateways = Vec::new();
        for i in 0..n {
            let (proxy, admin) = (free_port(), free_port());
            let config = d.join(format!("gw{i}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "listeners:\n  proxy: 127.0.0.1:{proxy}\n  admin: 127.0.0.1:{admin}\npolicies: {p}\ndata_dir: {data}\nkeys:\n  gateway: {key}\naudit:\n  origin: fleet.test/log\nstate:\n  backend: postgres\n  postgres:\n    url_file: {url_file}\n    connect_timeout: 1s\n    statement_timeout: 1s\nnetwork:\n  allow_private_destinations: [127.0.0.0/8]\n{admin_keys}{extra}",
                    p = d.join("policies").display(),
                    data = d.join(format!("data{i}")).display(),
                    key = key.display(),
                    url_file = d.join("pg-url").display(),
                    admin_keys = admin_keys(&[("ops", APPROVER, "approver")]),
                ),
            )
            .unwrap();
            gateways.push(Gw { proxy, admin, config, child: None, name: format!("gw-{i}") });
        }
        std::fs::write(d.join("pg-url"), pg.url()).unwrap();
        let mut f = Fleet { dir, gateways };
        for i in 0..n {
            f.spawn(i).await;
        }
        f
    }

    async fn spawn(&mut self, i: usize) {
        let g = &mut self.gateways[i];
        let log = self.dir.path().join(format!("{}.log", g.name));
        let child = g.child.insert(spawn_gateway(&g.config, &log, &[("HOSTNAME", &g.name)]));
        wait_ready(format!("127.0.0.1:{}", g.admin).parse().unwrap(), child, &log).await;
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.gateways[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: a graceful stop.
    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.gateways[i].child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }

    fn base(&self, i: usize, rest: &str) -> String {
        format!("http://127.0.0.1:{}{rest}", self.gateways[i].proxy)
    }

    fn admin(&self, i: usize, rest: &str) -> String {
        format!("http://127.0.0.1:{}{rest}", self.gateways[i].admin)
    }

    /// Every entry of the fleet's log, read from PostgreSQL through `export -c`.
    fn entries(&self) -> Vec<Value> {
        let out = self.dir.path().join(format!("export-{}", rand_hex()));
        let (code, _, err) = run_cli(
            &["export", "-c", self.gateways[0].config.to_str().unwrap(), "--out", out.to_str().unwrap()],
            self.dir.path(),
        );
        assert_eq!(code, 0, "export: {err}");
        std::fs::read_to_string(out.join("entries.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.gateways.len() {
            self.kill(i);
        }
    }
}

/// GET an admin path of gateway `i` with the approver key, as JSON.
async fn admin_get(f: &Fleet, i: usize, path: &str) -> Value {
    client().get(f.admin(i, path)).bearer_auth(APPROVER).send().await.unwrap().json().await.unwrap()
}

/// Approves `id` on gateway `i`: the status and the answer (with the override token).
async fn approve_on(f: &Fleet, i: usize, id: &str) -> (u16, Value) {
    approve_at(&f.admin(i, ""), id, APPROVER).await
}

/// A refund through `url` (see `refund_at`): the status and the JSON answer.
async fn refund(url: String, tok: &str, amount: u64, over: Option<&str>) -> (u16, Value) {
    let r = refund_at(&url, tok, amount, over).await;
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// `n` concurrent refunds of `amount` cents, spread round-robin over the fleet.
async fn spread(f: &Fleet, tok: &str, n: usize, amount: u64) -> Vec<(u16, Value)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (url, tok) = (f.base(i % f.gateways.len(), "/shop/v1/refunds"), tok.to_string());
            tokio::spawn(async move { refund(url, &tok, amount, None).await })
        })
        .collect();
    join_all(tasks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_budget_and_one_log_for_three_gateways() {
    let Some(pg) = Pg::start() else { return };
    let up = Upstream::start().await;
    let spend = format!("{POLICY}  budgets:\n    - window: day\n      max_spend: {{ USD: \"100.00\" }}\n");
    let actions = format!("{POLICY}  budgets:\n    - window: day\n      max_actions: 10\n");
    let mut f = Fleet::start(
        &pg,
        3,
        &[
            ("spend.yaml", manifest("spend-agent", up.addr, &spend, "")),
            ("act.yaml", manifest("act-agent", up.addr, &actions, "")),
        ],
    )
    .await;

    // 60 concurrent 5.00 USD refunds over 3 gateways under max_spend 100.00: exactly 20.
    let results = spread(&f, &token("spend-agent"), 60, 500).await;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 20, "{results:?}");
    assert!(results.iter().filter(|(s, _)| *s != 200).all(|(s, v)| *s == 403 && reason(v) == "budget_exceeded"));
    assert_eq!(up.count(), 20);
    // max_actions 10: exactly 10 of 40.
    let results = spread(&f, &token("act-agent"), 40, 100).await;
    assert_eq!(results.iter().filter(|(s, _)| *s == 200).count(), 10, "{results:?}");
    assert_eq!(up.count(), 30);

    // One log: every gateway's decisions, each naming its gateway, dense and verifiable.
    let entries = f.entries();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["idx"], i.to_string());
    }
    let allowed: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "decision" && e["decision"] == "allow").collect();
    assert_eq!(allowed.len(), 30);
    let names: std::collections::BTreeSet<&str> =
        entries.iter().filter(|e| e["kind"] == "decision").filter_map(|e| e["gateway"].as_str()).collect();
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["gw-0", "gw-1", "gw-2"]);
    let starts = entries.iter().filter(|e| e["kind"] == "startup").count();
    assert_eq!(starts, 3);
    let d = f.dir.path().to_path_buf();
    let cfg = f.gateways[1].config.to_str().unwrap().to_string();
    let (code, out, err) = run_cli(&["verify", "-c", &cfg], &d);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("entries verified"), "{out}");
    let bundle = d.join("bundle");
    let (code, _, err) = run_cli(&["export", "-c", &cfg, "--out", bundle.to_str().unwrap()], &d);
    assert_eq!(code, 0, "{err}");
    let key = uapk_gateway::identity::load_signing_key(&d.join("gateway.pem")).unwrap();
    std::fs::write(d.join("gateway.pub.pem"), uapk_gateway::identity::verifying_key_pem(&key.verifying_key())).unwrap();
    let pubkey = d.join("gateway.pub.pem");
    let (code, out, err) =
        run_cli(&["verify", "--bundle", bundle.to_str().unwrap(), "--key", pubkey.to_str().unwrap()], &d);
    assert_eq!(code, 0, "{out}{err}");
    let py = python_verify(&bundle, &pubkey, &d);
    assert!(py.status.success(), "{}{}", String::from_utf8_lossy(&py.stdout), String::from_utf8_lossy(&py.stderr));

    // Budgets stay spent after every gateway restarts.
    for i in 0..3 {
        f.stop(i);
    }
    for i in 0..3 {
        f.spawn(i).await;
    }
    for i in 0..3 {
        let (s, v) = refund(f.base(i, "/shop/v1/refunds"), &token("spend-agent"), 500, None).await;
        assert_eq!((s, reason(&v)), (403, "budget_exceeded"), "{v}");
    }
    assert_eq!(up.count(), 30);
    // What PostgreSQL holds: one counter for the agent's day, at 100.00 USD.
    let spent = pg
        .psql("SELECT spend FROM uapk_budget_counters WHERE agent = 'spend-agent' AND win = 'day' AND scope = 'agent'");
    assert!(spent.contains("100"), "{spent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_approvals_queue_for_three_gateways() {
    let Some(pg) = Pg::start() else { return };
    let up = Upstream::start().await;
    let f = Fleet::start(
        &pg,
        3,
        &[
            ("pay.yaml", manifest("pay-agent", up.addr, POLICY, "escalation:\n  max_pending: 3\n")),
            ("hold.yaml", manifest("hold-agent", up.addr, POLICY, "escalation:\n  mode: hold\n  hold_timeout: 20s\n")),
        ],
    )
    .await;
    let tok = token("pay-agent");
    // Escalated on gateway 0, listed on 1, approved on 2.
    let (s, v) = refund(f.base(0, "/shop/v1/refunds"), &tok, 6000, None).await;
    assert_eq!(s, 403, "{v}");
    let id = v["approval_id"].as_str().unwrap().to_string();
    let list = admin_get(&f, 1, "/v1/approvals?status=pending").await;
    assert!(list["approvals"].as_array().unwrap().iter().any(|a| a["id"] == id.as_str()), "{list}");
    let got = admin_get(&f, 2, &format!("/v1/approvals/{id}")).await;
    assert_eq!(got["status"], "pending", "{got}");
    let (s, v) = approve_on(&f, 2, &id).await;
    assert_eq!(s, 200, "{v}");
    let over = v["override_token"].as_str().unwrap().to_string();
    // Its override, used 12 times at once over the fleet, is accepted exactly once.
    let tries: Vec<_> = (0..12)
        .map(|i| {
            let (url, tok, over) = (f.base(i % 3, "/shop/v1/refunds"), tok.clone(), over.clone());
            tokio::spawn(async move { refund(url, &tok, 6000, Some(&over)).await })
        })
        .collect();
    let results = join_all(tries).await;
    assert_eq!(results.iter().filter(|(s, _)| *s == 200).count(), 1, "{results:?}");
    assert!(
        results.iter().filter(|(s, _)| *s != 200).all(|(s, v)| *s == 403 && reason(v) == "override_token_already_used"),
        "{results:?}"
    );
    assert_eq!(up.count(), 1);

    // max_pending counts the fleet: 3 pending at most, wherever they were made.
    let mut codes = Vec::new();
    for i in 0..4 {
        let (s, v) = refund(f.base(i % 3, "/shop/v1/refunds"), &tok, 6000, None).await;
        codes.push((s, v["approval_id"].is_string(), reason(&v).to_string()));
    }
    assert_eq!(codes.iter().filter(|c| c.1).count(), 3, "{codes:?}");
    assert_eq!(codes[3].2, "too_many_pending_approvals", "{codes:?}");

    // A request held on gateway 0 proceeds within a second of its approval on gateway 1.
    let url = f.base(0, "/shop/v1/refunds");
    let held = tokio::spawn(async move {
        let r = refund(url, &token("hold-agent"), 7000, None).await;
        (r, Instant::now())
    });
    let hid =
        eventually("the held request's approval to be listed on another gateway", Duration::from_secs(5), async || {
            let list = admin_get(&f, 1, "/v1/approvals?status=pending").await;
            list["approvals"].as_array().unwrap().iter().find(|a| a["agent"] == "hold-agent")?["id"]
                .as_str()
                .map(String::from)
        })
        .await;
    // Each gateway listens for decisions (NOTIFY), besides polling.
    let listening = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN uapk_approvals'");
    assert_eq!(listening, "3");
    let approved_at = Instant::now();
    assert_eq!(approve_on(&f, 1, &hid).await.0, 200);
    let ((s, v), done) = held.await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(done.duration_since(approved_at) < Duration::from_secs(1), "{:?}", done.duration_since(approved_at));
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outages_refuse_traffic_and_heal_by_themselves() {
    let Some(pg) = Pg::start() else { return };
    let up = Upstream::start().await;
    let budgeted = format!("{POLICY}  budgets:\n    - window: day\n      max_actions: 100\n");
    let mut f = Fleet::start(
        &pg,
        2,
        &[
            ("pay.yaml", manifest("pay-agent", up.addr, POLICY, "")),
            ("b.yaml", manifest("b-agent", up.addr, &budgeted, "")),
        ],
    )
    .await;
    let tok = token("pay-agent");
    assert_eq!(refund(f.base(0, "/shop/v1/refunds"), &tok, 1000, None).await.0, 200);
    pg.kill();
    // Refused within connect_timeout + statement_timeout (1 s + 1 s here), with or without a
    // budget to reserve.
    for agent in ["pay-agent", "b-agent"] {
        let started = Instant::now();
        let (s, v) = refund(f.base(1, "/shop/v1/refunds"), &token(agent), 1000, None).await;
        assert_eq!((s, reason(&v)), (503, "audit_unavailable"), "{agent}: {v}");
        assert!(started.elapsed() < Duration::from_secs(3), "{agent}: {:?}", started.elapsed());
    }
    assert_eq!(up.count(), 1, "nothing is forwarded while the log cannot commit");
    // Readiness reports the database on every gateway, also one that served nothing since.
    let down = Instant::now();
    loop {
        let r = client().get(f.admin(0, "/readyz")).send().await.unwrap();
        if r.status() == 503 {
            assert_eq!(r.json::<Value>().await.unwrap()["state"], false);
            break;
        }
        assert!(down.elapsed() < Duration::from_secs(5), "gateway 0 still ready with the database down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client().get(f.admin(0, "/livez")).send().await.unwrap().status(), 200);
    pg.up();
    let back = Instant::now();
    // Ready again within 5 s on every gateway, without a request to tell it (a gateway out of
    // its Service gets none): also the one whose append failed.
    for i in 0..2 {
        while client().get(f.admin(i, "/readyz")).send().await.unwrap().status() != 200 {
            assert!(back.elapsed() < Duration::from_secs(5), "gateway {i} not ready again within 5 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    loop {
        let (s, _) = refund(f.base(1, "/shop/v1/refunds"), &tok, 1000, None).await;
        if s == 200 {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(5), "not served again within 5 s: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = client().get(f.admin(1, "/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("uapk_state_up{backend=\"postgres\"} 1"), "{m}");
    assert!(m.contains("uapk_state_duration_seconds_count{backend=\"postgres\",op=\"append\"}"), "{m}");

    // SIGKILL of one gateway under load loses nothing: every forwarded request is in the log.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for c in 0..6 {
        let (url, tok, stop) = (f.base(c % 2, "/shop/v1/refunds"), tok.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(r) = client()
                    .post(&url)
                    .header("x-uapk-capability", &tok)
                    .header("x-country", "US")
                    .json(&json!({"amount": 100, "currency": "USD", "customer": "cus_1"}))
                    .send()
                    .await
                    && r.status() == 200
                    && let Some(idx) =
                        r.headers().get("x-uapk-record").and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                {
                    acked.push(idx);
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    f.kill(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked: Vec<u64> = join_all(load).await.into_iter().flatten().collect();
    assert!(acked.len() > 10, "{}", acked.len());
    let entries = f.entries();
    for idx in &acked {
        let e = &entries[*idx as usize];
        assert_eq!((e["kind"].as_str(), e["decision"].as_str()), (Some("decision"), Some("allow")), "{e}");
    }
    let allowed = entries.iter().filter(|e| e["kind"] == "decision" && e["decision"] == "allow").count();
    assert!(allowed >= up.count(), "{allowed} allowed decisions, {} forwarded", up.count());
    let (code, out, err) = run_cli(&["verify", "-c", f.gateways[0].config.to_str().unwrap()], f.dir.path());
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_key_and_an_older_backup_are_caught() {
    let Some(pg) = Pg::start() else { return };
    let up = Upstream::start().await;
    let mut f = Fleet::start(&pg, 1, &[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))]).await;
    let tok = token("pay-agent");
    assert_eq!(refund(f.base(0, "/shop/v1/refunds"), &tok, 1000, None).await.0, 200);
    let d = f.dir.path().to_path_buf();
    let dump = d.join("backup.sql");
    let out = pg.tool("pg_dump", &["-f", dump.to_str().unwrap(), "postgres"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..3 {
        assert_eq!(refund(f.base(0, "/shop/v1/refunds"), &tok, 1000, None).await.0, 200);
    }
    // A checkpoint kept after the backup.
    let note = client().get(f.admin(0, "/v1/checkpoint")).send().await.unwrap().text().await.unwrap();
    std::fs::write(d.join("trusted.txt"), &note).unwrap();
    f.stop(0);
    // A gateway with another key refuses to start on the log.
    let other = d.join("other.pem");
    assert_eq!(run_cli(&["keygen", "--out", other.to_str().unwrap()], &d).0, 0);
    let cfg = std::fs::read_to_string(&f.gateways[0].config).unwrap();
    let other_cfg = d.join("other.yaml");
    std::fs::write(&other_cfg, cfg.replace(d.join("gateway.pem").to_str().unwrap(), other.to_str().unwrap())).unwrap();
    let out = Command::new(bin()).args(["run", "-c", other_cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keys.gateway is not the active key of log fleet.test/log"), "{err}");
    // The database restored from the older backup: verify with the later checkpoint exits 1.
    pg.psql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;");
    let out = pg.tool("psql", &["-q", "-f", dump.to_str().unwrap(), "postgres"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg0 = f.gateways[0].config.to_str().unwrap().to_string();
    let (code, _, _) = run_cli(&["verify", "-c", &cfg0], &d);
    assert_eq!(code, 0, "the older log is consistent by itself");
    let (code, out, err) =
        run_cli(&["verify", "-c", &cfg0, "--trusted-checkpoint", d.join("trusted.txt").to_str().unwrap()], &d);
    assert_eq!(code, 1, "{out}{err}");
    // The URL never shows its password: a wrong one is reported without it.
    std::fs::write(
        d.join("pg-url"),
        format!("postgres://postgres:s3cret-pw@127.0.0.1:{}/nodb?sslmode=disable", pg.port),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["verify", "-c", &cfg0], &d);
    assert_ne!(code, 0);
    assert!(!format!("{out}{err}").contains("s3cret-pw"), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotating_the_fleet_key_fails_the_old_key_closed() {
    let Some(pg) = Pg::start() else { return };
    let up = Upstream::start().await;
    let mut f = Fleet::start(&pg, 2, &[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))]).await;
    let tok = token("pay-agent");
    assert_eq!(refund(f.base(0, "/shop/v1/refunds"), &tok, 1000, None).await.0, 200);
    let d = f.dir.path().to_path_buf();
    let new = d.join("new.pem");
    assert_eq!(run_cli(&["keygen", "--out", new.to_str().unwrap()], &d).0, 0);
    let (code, out, err) =
        run_cli(&["rotate-key", "-c", f.gateways[0].config.to_str().unwrap(), "--new-key", new.to_str().unwrap()], &d);
    assert_eq!(code, 0, "{out}{err}");
    // Both gateways still hold the old key: they refuse to record, so nothing is forwarded.
    for i in 0..2 {
        let (s, v) = refund(f.base(i, "/shop/v1/refunds"), &tok, 1000, None).await;
        assert_eq!((s, reason(&v)), (503, "audit_unavailable"), "{v}");
    }
    assert_eq!(up.count(), 1);
    // Restarted with the new key, they record again.
    let old = d.join("gateway.pem");
    for i in 0..2 {
        f.stop(i);
        let cfg = std::fs::read_to_string(&f.gateways[i].config).unwrap();
        std::fs::write(&f.gateways[i].config, cfg.replace(old.to_str().unwrap(), new.to_str().unwrap())).unwrap();
        f.spawn(i).await;
        assert_eq!(refund(f.base(i, "/shop/v1/refunds"), &tok, 1000, None).await.0, 200);
    }
    // The log verifies from the original key across the rotation.
    let pem = |p: &Path| {
        let k = uapk_gateway::identity::load_signing_key(p).unwrap();
        let out = p.with_extension("pub.pem");
        std::fs::write(&out, uapk_gateway::identity::verifying_key_pem(&k.verifying_key())).unwrap();
        out
    };
    let (old_pub, new_pub) = (pem(&old), pem(&new));
    let cfg0 = f.gateways[0].config.to_str().unwrap().to_string();
    let (code, out, err) =
        run_cli(&["verify", "-c", &cfg0, "--key", old_pub.to_str().unwrap(), "--key", new_pub.to_str().unwrap()], &d);
    assert_eq!(code, 0, "{out}{err}");
    let rotations = f.entries().iter().filter(|e| e["kind"] == "key").count();
    assert_eq!(rotations, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_rate_limit_in_redis_for_three_gateways() {
    let Some(pg) = Pg::start() else { return };
    let Some(mut redis) = RedisServer::start() else { return };
    let up = Upstream::start().await;
    let limited = format!("{POLICY}  rate_limits:\n    - scope: agent\n      rate: 5/m\n      burst: 5\n");
    let f = Fleet::start_with(
        &pg,
        3,
        &[
            ("lim.yaml", manifest("lim-agent", up.addr, &limited, "")),
            ("free.yaml", manifest("free-agent", up.addr, POLICY, "")),
        ],
        &redis.config_with_timeout("2s"),
    )
    .await;
    // 30 concurrent requests over 3 gateways under one 5/minute limit: exactly 5.
    let results = spread(&f, &token("lim-agent"), 30, 100).await;
    assert_eq!(results.iter().filter(|(s, _)| *s == 200).count(), 5, "{results:?}");
    assert!(
        results.iter().filter(|(s, _)| *s != 200).all(|(s, v)| *s == 429 && reason(v) == "rate_limited"),
        "{results:?}"
    );
    assert_eq!(up.count(), 5);
    // Redis gone: the rate-limited agent is refused 503 on every gateway, the other is served.
    redis.kill();
    for i in 0..3 {
        let (s, v) = refund(f.base(i, "/shop/v1/refunds"), &token("lim-agent"), 100, None).await;
        assert_eq!((s, reason(&v)), (503, "rate_limit_unavailable"), "{v}");
        assert_eq!(refund(f.base(i, "/shop/v1/refunds"), &token("free-agent"), 100, None).await.0, 200);
    }
    assert_eq!(up.count(), 8);
    let refused = f
        .entries()
        .into_iter()
        .filter(|e| e["kind"] == "decision" && e["reasons"][0]["code"] == "rate_limit_unavailable")
        .count();
    assert_eq!(refused, 3, "every 503 is in the fleet's log");
}
