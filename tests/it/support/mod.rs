//! Test harness: a real gateway started in-process from YAML on port 0, a real upstream HTTP
//! server on 127.0.0.1:0 that records what reaches it, and real clients.
#![allow(dead_code)]

pub mod llm;
pub mod postgres;
pub mod redis;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uapk_gateway::runtime::{self, Running};

/// What one upstream request looked like.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

type Hook = Arc<dyn Fn(&Seen) -> (u16, String) + Send + Sync>;

/// A loopback HTTP/1.1 upstream that records every request and answers 200 with a JSON echo,
/// or whatever its hook says.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let hook: Arc<Mutex<Option<Hook>>> = Arc::default();
        let (s2, h2) = (seen.clone(), hook.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (seen, hook) = (s2.clone(), h2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (seen, hook) = (seen.clone(), hook.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let s = Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                            };
                            let h = hook.lock().unwrap().clone();
                            let (status, text) = match h {
                                Some(h) => h(&s),
                                None => (200, serde_json::json!({"ok": true, "path": s.path}).to_string()),
                            };
                            seen.lock().unwrap().push(s);
                            let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen, hook }
    }

    pub fn set_hook(&self, f: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(Arc::new(f));
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("the upstream saw no request")
    }
}

/// The issuer key shared by test manifests.
pub fn issuer_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

pub fn issuer_pub_pem() -> String {
    uapk_gateway::identity::verifying_key_pem(&issuer_key().verifying_key())
}

/// A manifest for `agent` with one connector `shop` pointing at the upstream; `policy` is the
/// YAML of the `policy:` block body (indented two spaces), `extra` appended at top level.
pub fn manifest(agent: &str, upstream: SocketAddr, policy: &str, extra: &str) -> String {
    let pem: String = issuer_pub_pem().lines().map(|l| format!("        {l}\n")).collect();
    format!(
        r#"apiVersion: uapk/v1
kind: Manifest
agent:
  id: {agent}
capability:
  required: true
  max_lifetime: 24h
  issuers:
    - id: platform
      public_key: |
{pem}  revoked: [revoked-jti]
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
pub fn meter_manifest(upstream: SocketAddr, policy: &str) -> String {
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
pub const POLICY: &str = r#"  connectors:   { allow: [shop], deny: [other] }
  action_types: { allow: [], deny: [payment.delete] }
  amount_caps:  { USD: "100.00", EUR: "90.00" }
  approval:
    amount_above: { USD: "50.00" }
  jurisdictions:  { allow: [US, CA] }
  counterparties: { deny: [cus_blocked] }
"#;

pub struct TestGateway {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
}

impl TestGateway {
    /// Starts a gateway serving `manifests` (file name, text) with `extra_config` appended to
    /// gateway.yaml.
    pub async fn start(manifests: &[(&str, String)], extra_config: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, manifests, extra_config).await
    }

    pub async fn start_in(dir: tempfile::TempDir, manifests: &[(&str, String)], extra_config: &str) -> TestGateway {
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        for (name, text) in manifests {
            std::fs::write(policies.join(name), text).unwrap();
        }
        let config_path = dir.path().join("gateway.yaml");
        if !config_path.exists() {
            let cfg = format!(
                "listeners:\n  proxy: 127.0.0.1:0\n  admin: 127.0.0.1:0\npolicies: {}\ndata_dir: {}\naudit:\n  origin: test.example/log\nnetwork:\n  allow_private_destinations: [127.0.0.0/8]\nlog_format: text\n{extra_config}",
                policies.display(),
                dir.path().join("data").display()
            );
            std::fs::write(&config_path, cfg).unwrap();
        }
        let cfg = uapk_gateway::config::load_gateway(Some(&config_path)).unwrap_or_else(|e| panic!("{e}"));
        let running = runtime::start(cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
        TestGateway { proxy: running.proxy_addr, admin: running.admin_addr, running: Some(running), dir, config_path }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data().join("audit.redb")
    }

    pub fn gateway(&self) -> &Arc<uapk_gateway::proxy::Gateway> {
        &self.running.as_ref().unwrap().gateway
    }

    /// Stops the gateway (drain + flush) and returns its directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.dir
    }

    pub fn base(&self, rest: &str) -> String {
        format!("http://{}{rest}", self.proxy)
    }

    /// Every committed entry, parsed.
    pub fn entries(&self) -> Vec<serde_json::Value> {
        let db = self.running.as_ref().unwrap().gateway.db.get().unwrap();
        read_all(&db)
    }
}

pub fn read_all(db: &redb::Database) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let batch = uapk_gateway::audit::read_entries(db, from, 1000).unwrap();
        let Some(last) = batch.last().map(|(i, _)| *i) else { break };
        out.extend(batch.iter().map(|(_, b)| serde_json::from_slice(b).unwrap()));
        from = last + 1;
    }
    out
}

/// Decision entries only.
pub fn decisions(entries: &[serde_json::Value]) -> Vec<serde_json::Value> {
    entries.iter().filter(|e| e["kind"] == "decision").cloned().collect()
}

/// Claims for a valid token for `sub`, to adjust before minting.
pub fn claims(sub: &str) -> uapk_gateway::identity::CapabilityClaims {
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

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

pub fn rand_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub fn mint(c: &uapk_gateway::identity::CapabilityClaims) -> String {
    uapk_gateway::identity::mint(&issuer_key(), None, c).unwrap()
}

pub fn token(sub: &str) -> String {
    mint(&claims(sub))
}

/// A plain HTTP client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A client that uses the gateway as its explicit HTTP proxy.
pub fn proxied_client(gw: &TestGateway, token: Option<&str>) -> reqwest::Client {
    let url = match token {
        Some(t) => format!("http://agent:{t}@{}", gw.proxy),
        None => format!("http://{}", gw.proxy),
    };
    reqwest::Client::builder().proxy(reqwest::Proxy::http(url).unwrap()).build().unwrap()
}

/// The path of the built CLI binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_uapk-gateway")
}

pub fn run_cli(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(bin()).args(args).current_dir(cwd).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback HTTPS upstream (HTTP/1.1 and HTTP/2 by ALPN) with its own test CA, for
/// `tls.extra_upstream_roots`. Its certificate names `localhost` and 127.0.0.1.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl TlsUpstream {
    pub async fn start() -> TlsUpstream {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test upstream CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (acceptor, seen) = (acceptor.clone(), s2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let version = format!("{:?}", req.version());
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let path = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
                            seen.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path: path.clone(),
                                headers: parts.headers,
                                body,
                            });
                            let text = serde_json::json!({"ok": true, "tls": true, "path": path, "version": version})
                                .to_string();
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream { addr, ca_pem: ca.pem(), seen }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A loopback port that was free a moment ago (for configs of processes started later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A manifest for `tls-agent` with an `intercept` connector for `localhost:port` (GET
/// /v1/items/** → item.read) and a `passthrough` one for `127.0.0.1:port`; `tail` is appended
/// (e.g. a `policy:` block).
pub fn tls_manifest(port: u16, tail: &str) -> String {
    let pem: String = issuer_pub_pem().lines().map(|l| format!("        {l}\n")).collect();
    format!(
        r#"apiVersion: uapk/v1
kind: Manifest
agent: {{ id: tls-agent }}
capability:
  issuers:
    - id: platform
      public_key: |
{pem}connectors:
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
