//! A real gateway started in-process from YAML on port 0, and everything the tests read from
//! it. The tests reach the gateway's internals only through the methods here: each names the
//! `app::App` view it reads.

use super::log::Log;
use super::{client, eventually};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uapk_gateway::runtime::{self, Running};

/// The `gateway.yaml` the tests start from: `listeners` as given, `policies/` and `data/` under
/// `dir`, the log named `test.example/log`, loopback upstreams allowed; `extra` appended.
pub(crate) fn gateway_yaml(dir: &Path, proxy: &str, admin: &str, extra: &str) -> String {
    format!(
        "listeners:\n  proxy: {proxy}\n  admin: {admin}\npolicies: {}\ndata_dir: {}\naudit:\n  origin: test.example/log\nnetwork:\n  allow_private_destinations: [127.0.0.0/8]\n{extra}",
        dir.join("policies").display(),
        dir.join("data").display()
    )
}

/// Writes `manifests` (file name, text) into `dir/policies`.
pub(crate) fn write_policies(dir: &Path, manifests: &[(&str, String)]) {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for (name, text) in manifests {
        std::fs::write(policies.join(name), text).unwrap();
    }
}

/// Hits and misses of the gateway's leaf certificate cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeafCacheCounts {
    pub hits: u64,
    pub misses: u64,
}

pub(crate) struct TestGateway {
    running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
}

impl TestGateway {
    /// Starts a gateway serving `manifests` (file name, text) with `extra_config` appended to
    /// gateway.yaml.
    pub(crate) async fn start(manifests: &[(&str, String)], extra_config: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, manifests, extra_config).await
    }

    /// `start` in `dir`, whose own `gateway.yaml`, when it has one, is used as it is.
    pub(crate) async fn start_in(
        dir: tempfile::TempDir,
        manifests: &[(&str, String)],
        extra_config: &str,
    ) -> TestGateway {
        write_policies(dir.path(), manifests);
        let config_path = dir.path().join("gateway.yaml");
        if !config_path.exists() {
            let extra = format!("log_format: text\n{extra_config}");
            std::fs::write(&config_path, gateway_yaml(dir.path(), "127.0.0.1:0", "127.0.0.1:0", &extra)).unwrap();
        }
        let cfg = uapk_gateway::config::load_gateway(Some(&config_path)).unwrap_or_else(|e| panic!("{e}"));
        let running = runtime::start(cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
        TestGateway { proxy: running.proxy_addr, admin: running.admin_addr, running: Some(running), dir, config_path }
    }

    pub(crate) fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(crate) fn db_path(&self) -> PathBuf {
        self.data().join("audit.redb")
    }

    fn gateway(&self) -> &Arc<uapk_gateway::app::App> {
        &self.running.as_ref().expect("the gateway is running").gateway
    }

    /// Stops the gateway (drain + flush) and returns its directory for a restart.
    pub(crate) async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.dir
    }

    /// A URL on the proxy listener (base-URL mode).
    pub(crate) fn base(&self, rest: &str) -> String {
        format!("http://{}{rest}", self.proxy)
    }

    /// A URL on the admin listener.
    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The running gateway's log (`App::log`).
    pub(crate) fn log(&self) -> Log {
        Log::live(self.gateway().log().clone())
    }

    /// Every committed entry, parsed.
    pub(crate) fn entries(&self) -> Vec<Value> {
        self.log().entries()
    }

    /// Every committed entry as stored (its canonical bytes), with its index.
    pub(crate) fn raw_entries(&self) -> Vec<(u64, Vec<u8>)> {
        self.log().raw_entries()
    }

    /// The committed entry at index `idx`.
    pub(crate) fn entry(&self, idx: u64) -> Value {
        let want = idx.to_string();
        self.entries().into_iter().find(|e| e["idx"] == want.as_str()).unwrap_or_else(|| panic!("no entry {idx}"))
    }

    /// The outcome entry of the decision at `idx` (written when the response ends: waited for,
    /// 10 s at most).
    pub(crate) async fn outcome_of(&self, idx: u64) -> Value {
        let want = idx.to_string();
        eventually(format!("the outcome entry of decision {idx}"), Duration::from_secs(10), async || {
            self.entries().into_iter().find(|e| e["kind"] == "outcome" && e["decision_idx"] == want.as_str())
        })
        .await
    }

    /// The approval `id` as stored (`App::approvals`).
    pub(crate) async fn approval(&self, id: &str) -> uapk_gateway::approvals::Approval {
        self.gateway().approvals().fetch(id).await.unwrap().unwrap_or_else(|| panic!("no approval {id}"))
    }

    /// The embedded backend's budget counters (`App::budgets`).
    pub(crate) fn memory_budgets(&self) -> &uapk_gateway::limits::Budgets {
        self.gateway().budgets().memory().expect("the embedded state backend")
    }

    /// The most requests one agent may have in flight (`App::in_flight`).
    pub(crate) fn in_flight_max(&self) -> usize {
        self.gateway().in_flight().max()
    }

    /// The requests `agent` has in flight (`App::in_flight`).
    pub(crate) fn in_flight_of(&self, agent: &str) -> usize {
        self.gateway().in_flight().in_flight(agent)
    }

    /// DNS lookups the SSRF guard made so far (`App::vetter`).
    pub(crate) fn dns_lookups(&self) -> u64 {
        self.gateway().vetter().lookups.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The leaf certificate cache's counts (`App::leaves`).
    pub(crate) fn leaf_cache(&self) -> LeafCacheCounts {
        let leaves = self.gateway().leaves().expect("a leaf cache (interception is configured)");
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
        LeafCacheCounts { hits: load(&leaves.hits), misses: load(&leaves.misses) }
    }

    /// The configuration the gateway runs (`App::config`).
    pub(crate) fn config(&self) -> &uapk_gateway::config::GatewayConfig {
        self.gateway().config()
    }

    /// How many holders the gateway has (open tunnels and connections hold it).
    pub(crate) fn holders(&self) -> usize {
        Arc::strong_count(self.gateway())
    }

    /// `GET /metrics`, as text.
    pub(crate) async fn metrics(&self) -> String {
        client().get(self.admin_url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// `GET /readyz`: the status and the JSON body.
    pub(crate) async fn readyz(&self) -> (u16, Value) {
        let r = client().get(self.admin_url("/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// `GET path` on the proxy listener (base-URL mode) with the capability token `tok`.
    pub(crate) async fn get(&self, path: &str, tok: &str) -> reqwest::Response {
        client().get(self.base(path)).header("x-uapk-capability", tok).send().await.unwrap()
    }

    /// A refund of `amount` cents to `cus_1` from the US on the `shop` connector, with the
    /// override token `over` when given.
    pub(crate) async fn refund(&self, tok: &str, amount: u64, over: Option<&str>) -> reqwest::Response {
        refund_at(&self.base("/shop/v1/refunds"), tok, amount, over).await
    }

    /// Approves `id` with the admin `key`: the status and the answer (with the override token).
    pub(crate) async fn approve(&self, id: &str, key: &str) -> (u16, Value) {
        approve_at(&self.admin_url(""), id, key).await
    }
}

/// `POST url` with a refund of `amount` cents in USD to `cus_1` from the US (the `shop`
/// connector's refund route), with the override token `over` when given.
pub(crate) async fn refund_at(url: &str, tok: &str, amount: u64, over: Option<&str>) -> reqwest::Response {
    let mut rb = client()
        .post(url)
        .header("x-uapk-capability", tok)
        .header("x-country", "US")
        .json(&json!({"amount": amount, "currency": "USD", "customer": "cus_1"}));
    if let Some(o) = over {
        rb = rb.header("x-uapk-override", o);
    }
    rb.send().await.unwrap()
}

/// Approves `id` on the admin API at `admin` (`http://host:port`) with `key`: the status and the
/// answer (with the override token).
pub(crate) async fn approve_at(admin: &str, id: &str, key: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{admin}/v1/approvals/{id}/approve"))
        .bearer_auth(key)
        .json(&json!({"note": "ok"}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}
