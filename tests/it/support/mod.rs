//! The harness of the end-to-end tests: real gateways (in-process, `gateway`, or the built
//! binary as a child process, `child`), real upstreams (`upstream`, `llm`), a private PostgreSQL
//! and Redis (`postgres`, `redis`), real clients, raw HTTP on a socket (`wire`), and the one way
//! the tests read a gateway's log (`log`).

mod child;
mod gateway;
pub(crate) mod llm;
mod log;
pub(crate) mod postgres;
pub(crate) mod redis;
mod upstream;
mod wire;

pub(crate) use child::*;
pub(crate) use gateway::*;
pub(crate) use log::*;
pub(crate) use upstream::*;
pub(crate) use wire::*;

use ed25519_dalek::SigningKey;
use serde_json::Value;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The issuer key shared by test manifests.
pub(crate) fn issuer_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

pub(crate) fn issuer_pub_pem() -> String {
    uapk_gateway::identity::verifying_key_pem(&issuer_key().verifying_key())
}

/// The start of a manifest for `agent`, to its `capability.issuers` list: the issuer `platform`
/// with the test issuer's key; `capability` (lines indented two spaces) comes before the list.
/// The rest of the manifest (more of `capability`, `connectors`, …) follows it.
pub(crate) fn manifest_head(agent: &str, capability: &str) -> String {
    let pem: String = issuer_pub_pem().lines().map(|l| format!("        {l}\n")).collect();
    format!(
        "apiVersion: uapk/v1\nkind: Manifest\nagent:\n  id: {agent}\ncapability:\n{capability}  issuers:\n    - id: platform\n      public_key: |\n{pem}"
    )
}

/// A manifest for `agent` with one connector `shop` pointing at the upstream; `policy` is the
/// YAML of the `policy:` block body (indented two spaces), `extra` appended at top level.
pub(crate) fn manifest(agent: &str, upstream: SocketAddr, policy: &str, extra: &str) -> String {
    let head = manifest_head(agent, "  required: true\n  max_lifetime: 24h\n");
    format!(
        r#"{head}  revoked: [revoked-jti]
connectors:
  - name: shop
    base_url: http://{upstream}
    hosts: [127.0.0.1, shop.test]
    ports: [{port}]
    routes:
      - methods: [POST]
        path: /v1/refunds
        action: payment.refund
        params:
          amount:       {{ json: /amount, scale: 2 }}
          currency:     {{ json: /currency }}
          counterparty: {{ json: /customer }}
          jurisdiction: {{ header: x-country }}
      - methods: [POST]
        path: /v1/charges
        action: payment.charge
        params:
          amount:   {{ json: /amount }}
          currency: {{ json: /currency }}
      - methods: [GET]
        path: /v1/charges/**
        action: payment.read
      - methods: [DELETE]
        path: /v1/charges/{{id}}
        action: payment.delete
  - name: other
    base_url: http://{upstream}
    hosts: [other.test]
    routes:
      - path: /**
        action: other.any
policy:
{policy}
{extra}"#,
        port = upstream.port()
    )
}

/// A manifest for `meter-agent` (no token required) with a `shop` connector (GET /v1/** →
/// item.read) on the upstream and a `meta` connector on the cloud metadata address, which the
/// SSRF guard refuses; `policy` is the body of its `policy:` block.
pub(crate) fn meter_manifest(upstream: SocketAddr, policy: &str) -> String {
    format!(
        r#"apiVersion: uapk/v1
kind: Manifest
agent: {{ id: meter-agent }}
capability: {{ required: false }}
connectors:
  - name: shop
    base_url: http://{upstream}
    routes:
      - methods: [GET]
        path: /v1/**
        action: item.read
  - name: meta
    base_url: http://169.254.169.254
    routes:
      - methods: [GET]
        path: /**
        action: item.read
policy:
{policy}"#
    )
}

/// The default policy block used by most tests.
pub(crate) const POLICY: &str = r#"  connectors:   { allow: [shop], deny: [other] }
  action_types: { allow: [], deny: [payment.delete] }
  amount_caps:  { USD: "100.00", EUR: "90.00" }
  approval:
    amount_above: { USD: "50.00" }
  jurisdictions:  { allow: [US, CA] }
  counterparties: { deny: [cus_blocked] }
"#;

/// Decision entries only.
pub(crate) fn decisions(entries: &[serde_json::Value]) -> Vec<serde_json::Value> {
    entries.iter().filter(|e| e["kind"] == "decision").cloned().collect()
}

/// Claims for a valid token for `sub`, to adjust before minting.
pub(crate) fn claims(sub: &str) -> uapk_gateway::identity::CapabilityClaims {
    let now = now();
    uapk_gateway::identity::CapabilityClaims {
        iss: "platform".into(),
        sub: sub.into(),
        aud: uapk_gateway::identity::Audience::from(vec!["uapk-gateway".to_string()]),
        exp: now + 3600,
        iat: now,
        nbf: None,
        jti: Some(format!("jti-{}", rand_hex())),
        connectors: None,
        action_types: None,
        constraints: None,
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

pub(crate) fn rand_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub(crate) fn mint(c: &uapk_gateway::identity::CapabilityClaims) -> String {
    uapk_gateway::identity::mint(&issuer_key(), None, c).unwrap()
}

pub(crate) fn token(sub: &str) -> String {
    mint(&claims(sub))
}

/// The record index a response names in `x-uapk-record`.
pub(crate) fn record_of(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("x-uapk-record")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or_else(|| panic!("no x-uapk-record on a {} answer", r.status()))
}

/// A plain HTTP client that never uses a proxy from the environment.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A client that uses the gateway as its explicit HTTP proxy.
pub(crate) fn proxied_client(gw: &TestGateway, token: Option<&str>) -> reqwest::Client {
    let url = match token {
        Some(t) => format!("http://agent:{t}@{}", gw.proxy),
        None => format!("http://{}", gw.proxy),
    };
    reqwest::Client::builder().proxy(reqwest::Proxy::http(url).unwrap()).build().unwrap()
}

/// The path of the built CLI binary.
pub(crate) fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_uapk-gateway")
}

/// Runs the CLI with `args` in `cwd`: exit code, stdout, stderr.
pub(crate) fn run_cli(args: &[&str], cwd: &Path) -> (i32, String, String) {
    run_cli_with(args, cwd, &[])
}

/// `run_cli` with `env` set (and `UAPK_ADMIN_KEY` only if `env` sets it).
pub(crate) fn run_cli_with(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("UAPK_ADMIN_KEY")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `scripts/verify_log_chain.py`, the auditors' independent verifier, on `bundle` with
/// the public key `key`, in `cwd`.
pub(crate) fn python_verify(bundle: &Path, key: &Path, cwd: &Path) -> std::process::Output {
    std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/verify_log_chain.py"))
        .arg("--bundle")
        .arg(bundle)
        .arg("--key")
        .arg(key)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Polls `check` every 20 ms until it returns a value; panics naming `what` after `within`.
pub(crate) async fn eventually<T>(
    what: impl Display,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < within, "waited {within:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What `tasks` returned, in their order (each must finish without panicking).
pub(crate) async fn join_all<T>(tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Lowercase hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The `admin:` block of gateway.yaml for `keys`: (id, the key itself, role).
pub(crate) fn admin_keys(keys: &[(&str, &str, &str)]) -> String {
    let mut out = String::from("admin:\n  keys:\n");
    for (id, key, role) in keys {
        out.push_str(&format!("    - {{ id: {id}, sha256: {}, role: {role} }}\n", sha256_hex(key)));
    }
    out
}

/// The first reason code of a refusal's JSON body (empty when there is none).
pub(crate) fn reason(v: &Value) -> &str {
    v["reasons"][0]["code"].as_str().unwrap_or_default()
}

/// A compact JWS over exactly these header and payload bytes, signed with `key`: only the
/// gateway's rules can refuse it (the minting API refuses out-of-range times by itself).
pub(crate) fn sign_jws(key: &SigningKey, header: &str, payload: &str) -> String {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    format!("{input}.{}", b64(&key.sign(input.as_bytes()).to_bytes()))
}

/// Copies the directory `from` into `to`, subdirectories too.
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Whether the tests run as root.
pub(crate) fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A loopback port that was free a moment ago (for configs of processes started later).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A manifest for `tls-agent` with an `intercept` connector for `localhost:port` (GET
/// /v1/items/** → item.read) and a `passthrough` one for `127.0.0.1:port`; `tail` is appended
/// (e.g. a `policy:` block).
pub(crate) fn tls_manifest(port: u16, tail: &str) -> String {
    let head = manifest_head("tls-agent", "");
    format!(
        r#"{head}connectors:
  - name: secure
    hosts: [localhost]
    ports: [{port}]
    tls: intercept
    routes:
      - methods: [GET]
        path: /v1/items/**
        action: item.read
  - name: pinned
    hosts: [127.0.0.1]
    ports: [{port}]
    tls: passthrough
{tail}"#
    )
}
