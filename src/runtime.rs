//! Wires a validated configuration into a running gateway: keys, policies, the audit log,
//! budgets rebuilt from the log, the upstream client and the listeners. `start` returns once
//! every listener is bound, so tests (and `run`) get the real addresses, even for port 0.

use crate::admin::{self, AdminState};
use crate::audit::{self, AuditConfig};
use crate::config::{self, AuditDurability, GatewayConfig, Strictness};
use crate::limits::RateLimiters;
use crate::proxy::{self, App, Policies, TokenFile, conn, ssrf::Vetter, upstream};
use crate::state;
pub use crate::state::gateway_name;
use anyhow::{Context, Result, anyhow};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Map, Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// A gateway that is serving.
pub struct Running {
    /// Where the proxy listener (`listeners.proxy`) is bound, port 0 resolved.
    pub proxy_addr: SocketAddr,
    /// Where the transparent listener (`listeners.transparent`) is bound, when configured.
    pub transparent_addr: Option<SocketAddr>,
    /// Where the admin listener (`listeners.admin`) is bound.
    pub admin_addr: SocketAddr,
    /// What the listeners share: configuration, policies, the audit log, limits and the upstream
    /// client.
    pub gateway: Arc<App>,
    /// The admin listener's own state: readiness, the last reload error, operator-page sessions.
    pub admin: Arc<AdminState>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    audit: Option<state::Log>,
}

/// Loads the gateway key, generating a development key when it is missing.
fn gateway_key(cfg: &GatewayConfig) -> Result<ed25519_dalek::SigningKey> {
    if !cfg.gateway_key.exists() {
        crate::identity::generate_key_files(&cfg.gateway_key, false)
            .map_err(|e| anyhow!("generating gateway key {}: {e}", cfg.gateway_key.display()))?;
        tracing::warn!(
            path = %cfg.gateway_key.display(),
            "GENERATED A NEW DEVELOPMENT GATEWAY KEY: it signs the audit checkpoints; for production provide keys.gateway"
        );
    }
    crate::identity::load_signing_key(&cfg.gateway_key).map_err(|e| anyhow!("{e}"))
}

/// The key name used in checkpoint signatures: the log origin.
pub fn key_name(cfg: &GatewayConfig) -> String {
    cfg.audit.origin.clone()
}

fn config_entry(set: &config::PolicySet, event: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("kind".into(), json!("config"));
    m.insert("event".into(), json!(event));
    m.insert("policies_sha256".into(), json!(set.digest()));
    let manifests: Map<String, Value> = set
        .manifests
        .iter()
        .map(|(id, man)| (id.clone(), json!({"sha256": man.sha256, "mode": man.mode.as_str()})))
        .collect();
    m.insert("manifests".into(), Value::Object(manifests));
    // The files the manifests read (issuer keys, credentials): their SHA-256, never their
    // content (null: not readable now), so a rotated Secret is on record.
    let files: Map<String, Value> =
        set.file_hashes.iter().map(|(f, sha)| (f.display().to_string(), json!(sha))).collect();
    if !files.is_empty() {
        m.insert("files".into(), Value::Object(files));
    }
    if !set.invalid.is_empty() {
        let invalid: Vec<Value> =
            set.invalid.iter().map(|i| json!({"file": i.file.display().to_string(), "agent": i.agent})).collect();
        m.insert("invalid_manifests".into(), Value::Array(invalid));
    }
    m
}

/// Logs each manifest file that failed validation (its agent is refused `manifest_invalid`).
fn report_invalid(set: &config::PolicySet) {
    for i in &set.invalid {
        let errors = config::Diagnostics(i.errors.clone());
        tracing::error!(
            file = %i.file.display(),
            agent = i.agent.as_deref().unwrap_or("-"),
            "manifest invalid; its agent is refused manifest_invalid until it is fixed:\n{errors}"
        );
    }
}

fn server_builder(cfg: &GatewayConfig) -> auto::Builder<TokioExecutor> {
    conn::builder(&cfg.limits)
}

/// File descriptors kept out of the connection budget: the audit database, listeners, DNS,
/// the reload watcher, logs.
const RESERVED_FDS: usize = 64;

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (Linux).
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// The cap actually applied to the proxy and transparent listeners: `limits.max_connections`,
/// lowered when the process's open-file limit could not hold that many connections (up to two
/// descriptors each: the client's and the upstream's) next to the admin listener's own cap, so
/// that running out of descriptors refuses agent connections with a 503 instead of failing
/// every accept, `/livez` included.
pub(crate) fn effective_max_connections(configured: usize, admin: usize, open_files: Option<usize>) -> usize {
    match open_files {
        Some(n) => configured.min(n.saturating_sub(RESERVED_FDS + admin) / 2).max(1),
        None => configured,
    }
}

/// A log line for an error that may repeat many times a second: the first occurrence, then at
/// most one summary with the count every [`Repeated::EVERY`].
struct Repeated {
    what: &'static str,
    window: Option<Instant>,
    count: u64,
}

impl Repeated {
    const EVERY: Duration = Duration::from_secs(10);

    fn new(what: &'static str) -> Repeated {
        Repeated { what, window: None, count: 0 }
    }

    fn note(&mut self, detail: &dyn std::fmt::Display) {
        match self.tally(crate::clock::instant()) {
            Some(0) => tracing::warn!(error = %detail, "{}", self.what),
            Some(n) => {
                tracing::warn!(error = %detail, repeated = n, "{} (repeated {n} times in {:?})", self.what, Self::EVERY)
            }
            None => {}
        }
    }

    /// Counts one occurrence at `now`; `Some(n)` when a line is due: 0 for the first
    /// occurrence, else the number of occurrences since the last line.
    fn tally(&mut self, now: Instant) -> Option<u64> {
        match self.window {
            None => {
                self.window = Some(now);
                self.count = 0;
                Some(0)
            }
            Some(since) => {
                self.count += 1;
                if now.saturating_duration_since(since) < Self::EVERY {
                    return None;
                }
                let n = self.count;
                self.window = Some(now);
                self.count = 0;
                Some(n)
            }
        }
    }

    /// The condition is over: report what was not reported yet.
    fn clear(&mut self) {
        if self.window.take().is_some() && self.count > 0 {
            tracing::warn!(repeated = self.count, "{} (repeated {} more times, now over)", self.what, self.count);
        }
        self.count = 0;
    }
}

/// Waits between failed accepts: 10 ms, doubling to 1 s while errors last.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn new() -> Backoff {
        Backoff(Self::FIRST)
    }

    /// The wait after one more failure.
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

/// Accept with back-off: an accept error (EMFILE, ENFILE, ENOBUFS, …) waits instead of
/// spinning ([`Backoff`]); its log lines are rate-limited ([`Repeated`]).
struct Acceptor {
    listener: TcpListener,
    backoff: Backoff,
    errors: Repeated,
}

impl Acceptor {
    fn new(listener: TcpListener) -> Acceptor {
        Acceptor { listener, backoff: Backoff::new(), errors: Repeated::new("accept failed; backing off") }
    }

    async fn accept(&mut self) -> tokio::net::TcpStream {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    self.backoff.reset();
                    self.errors.clear();
                    return stream;
                }
                Err(e) => {
                    self.errors.note(&e);
                    tokio::time::sleep(self.backoff.next()).await;
                }
            }
        }
    }
}

/// Answers a connection past the cap with a ready-made 503 (`too_many_connections`) and closes
/// it; at most `OVERLOAD_WRITERS` at a time, each bounded to one second, beyond which the
/// connection is simply closed. The request head is read first (HTTP clients treat an answer
/// that comes before their request as an error); a connection that sends nothing, TLS, or the
/// HTTP/2 preface is closed without an answer.
fn refuse_connection(stream: tokio::net::TcpStream, writers: &Arc<Semaphore>, reply: &Arc<Vec<u8>>) {
    let Ok(permit) = writers.clone().try_acquire_owned() else { return };
    let reply = reply.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = stream;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            if head.first() == Some(&0x16) || head.starts_with(b"PRI * HTTP/2.0") {
                return;
            }
            let _ = stream.write_all(&reply).await;
            let _ = stream.shutdown().await;
            // Read what else the client sent (bounded) before closing: closing with unread bytes
            // resets the connection, and a reset can destroy the 503 before the client reads it.
            let mut left: usize = 64 * 1024;
            while left > 0 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
        drop(permit);
    });
}

const OVERLOAD_WRITERS: usize = 64;

/// Starts the gateway described by `cfg`, one named step at a time: bind the listeners, prepare
/// `data_dir` and the key, load the policies, open the state (log, budgets, approvals), record the
/// start, build the shared [`App`], then serve and start the background loops.
pub async fn start(cfg: GatewayConfig) -> Result<Running> {
    let listeners = Listeners::bind(&cfg).await?;
    create_data_dir(&cfg)?;
    let key = gateway_key(&cfg)?;
    let set = load_policies(&cfg)?;
    let metrics = crate::metrics::Metrics::default();
    let opened =
        state::open(&cfg, audit_config(&cfg), key.clone(), metrics.state.clone()).await.map_err(|e| anyhow!(e))?;
    record_start(&opened, &set).await?;
    let state::Opened { log: audit_log, budgets, approvals, replayed: _, fleet_db } = opened;
    let (client, vetter) = upstream_client(&cfg, &listeners)?;
    let parts = crate::app::Parts {
        policies: Policies::new(set),
        audit: audit_log.handle(),
        log: audit_log.reader(),
        budgets,
        fleet_db,
        rate_limits: rate_limiters(&cfg, &metrics).await?,
        approvals,
        client,
        vetter,
        key,
        token_file: cfg.identity.token_file.clone().map(TokenFile::new),
        telemetry: telemetry(&cfg, &metrics)?,
        leaves: interception_ca(&cfg)?,
        refusals: crate::limits::refusals::RefusalBudget::new(
            cfg.limits.refusals_per_second,
            cfg.limits.refusals_burst,
        ),
        // By default half the connections the listeners can hold, so one agent cannot hold them all.
        in_flight: crate::limits::in_flight::InFlight::new(cfg.limits.max_in_flight_per_agent.unwrap_or_else(|| {
            effective_max_connections(cfg.limits.max_connections, cfg.admin_max_connections, open_files_limit()) / 2
        })),
        metrics,
        config: cfg,
    };
    let gw = Arc::new(App::new(parts));
    let health = admin_state(&gw);
    let (shutdown, rx) = watch::channel(false);
    let (proxy_addr, admin_addr, transparent_addr) =
        (listeners.proxy_addr, listeners.admin_addr, listeners.transparent_addr);
    let mut tasks = listeners.serve(&gw, &health, &rx);
    tasks.push(tokio::spawn(sweep_loop(gw.clone(), rx.clone())));
    tasks.push(tokio::spawn(refusal_summary_loop(gw.clone(), rx.clone())));
    tasks.push(tokio::spawn(reload_loop(gw.clone(), health.clone(), rx.clone())));
    tasks.push(tokio::spawn(approval_expiry_loop(gw.clone(), rx.clone())));
    if let Some(db) = gw.fleet_db().cloned() {
        tasks.push(tokio::spawn(fleet_loop(gw.clone(), db, rx.clone())));
    }
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, "uapk-gateway serving");
    Ok(Running {
        proxy_addr,
        transparent_addr,
        admin_addr,
        gateway: gw,
        admin: health,
        shutdown,
        tasks,
        audit: Some(audit_log),
    })
}

/// The bound listeners. They are bound first: a port already in use is reported before anything
/// is created on disk (a development key or CA generated for a gateway that then cannot start).
/// Until the gateway serves, connections wait in the listen backlog.
struct Listeners {
    proxy: TcpListener,
    admin: TcpListener,
    transparent: Option<TcpListener>,
    /// ip6tables REDIRECT sends IPv6 connections to `[::1]:P`: the IPv4 wildcard or loopback
    /// transparent listener gets its IPv6 twin on the same port.
    transparent_v6: Option<TcpListener>,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    transparent_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(cfg: &GatewayConfig) -> Result<Listeners> {
        let proxy = TcpListener::bind(cfg.proxy_listener)
            .await
            .with_context(|| format!("binding listeners.proxy {}", cfg.proxy_listener))?;
        let admin = TcpListener::bind(cfg.admin_listener)
            .await
            .with_context(|| format!("binding listeners.admin {}", cfg.admin_listener))?;
        let transparent = match cfg.transparent_listener {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("binding listeners.transparent {a}"))?),
            None => None,
        };
        let transparent_addr = transparent.as_ref().and_then(|l| l.local_addr().ok());
        let transparent_v6 = match transparent_addr.and_then(ipv6_twin) {
            Some(a) => match bind_ipv6_only(a) {
                Ok(l) => Some(l),
                Err(e) => {
                    // Without IPv6 here (disabled, or absent from the kernel) a redirected IPv6
                    // connection has nowhere to go and is refused: nothing leaves undecided.
                    tracing::warn!(addr = %a, error = %e, "transparent listener: no IPv6 socket; IPv6 connections are refused");
                    None
                }
            },
            None => None,
        };
        Ok(Listeners {
            proxy_addr: proxy.local_addr()?,
            admin_addr: admin.local_addr()?,
            proxy,
            admin,
            transparent,
            transparent_v6,
            transparent_addr,
        })
    }

    /// The gateway's own addresses: never an upstream (the SSRF guard refuses them).
    fn own(&self) -> Vec<SocketAddr> {
        let v6 = self.transparent_v6.as_ref().and_then(|l| l.local_addr().ok());
        [Some(self.proxy_addr), Some(self.admin_addr), self.transparent_addr, v6].into_iter().flatten().collect()
    }

    /// Serves every listener until `shutdown`: one accept loop each.
    fn serve(
        self,
        gw: &Arc<App>,
        health: &Arc<AdminState>,
        shutdown: &watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let cfg = gw.config();
        // One cap for every agent-facing connection (proxy and transparent listeners, tunnels and
        // upgrades included); the admin listener has its own.
        let open_files = open_files_limit();
        let max_connections =
            effective_max_connections(cfg.limits.max_connections, cfg.admin_max_connections, open_files);
        if max_connections < cfg.limits.max_connections {
            tracing::warn!(
                configured = cfg.limits.max_connections,
                applied = max_connections,
                open_files = open_files.unwrap_or_default(),
                "limits.max_connections lowered to what the open-file limit can hold next to admin.max_connections; raise `ulimit -n` to serve more"
            );
        }
        let agent_slots = conn::Slots::new(max_connections);
        let own = self.own();
        let mut tasks = Vec::new();
        let gw2 = gw.clone();
        let svc = move |req| {
            let gw = gw2.clone();
            let arrival = proxy::Arrival::on_proxy_listener(&req);
            async move { Ok::<_, Infallible>(proxy::handle(gw, req, arrival).await) }
        };
        tasks.push(tokio::spawn(serve(
            self.proxy,
            server_builder(cfg),
            svc,
            agent_slots.clone(),
            "limits.max_connections",
            conn::ConnTimeouts::from_limits(&cfg.limits),
            shutdown.clone(),
        )));
        let (gw2, h2) = (gw.clone(), health.clone());
        let svc = move |req| {
            let (gw, h) = (gw2.clone(), h2.clone());
            async move { Ok::<_, Infallible>(admin::handle(gw, h, req).await) }
        };
        tasks.push(tokio::spawn(serve(
            self.admin,
            server_builder(cfg),
            svc,
            conn::Slots::new(cfg.admin_max_connections),
            "admin.max_connections",
            conn::ConnTimeouts::from_limits(&cfg.limits),
            shutdown.clone(),
        )));
        for listener in self.transparent.into_iter().chain(self.transparent_v6) {
            tasks.push(tokio::spawn(serve_transparent(
                listener,
                gw.clone(),
                own.clone(),
                agent_slots.clone(),
                shutdown.clone(),
            )));
        }
        tasks
    }
}

/// Creates `data_dir` 0700 (an existing directory keeps its mode: it may be a mounted volume).
fn create_data_dir(cfg: &GatewayConfig) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))
}

/// Loads the manifests. A broken manifest must not stop the valid ones: its agent is refused
/// `manifest_invalid` (SPEC §17).
fn load_policies(cfg: &GatewayConfig) -> Result<config::PolicySet> {
    let set = config::load_policies_lenient(&cfg.policies_dir, Strictness::Run)
        .map_err(|e| anyhow!("invalid policies:\n{e}"))?;
    for w in &set.warnings {
        tracing::warn!("{w}");
    }
    report_invalid(&set);
    Ok(set)
}

fn audit_config(cfg: &GatewayConfig) -> AuditConfig {
    AuditConfig {
        path: cfg.audit.path.clone(),
        origin: cfg.audit.origin.clone(),
        durability: match cfg.audit.durability {
            AuditDurability::Sync => audit::Durability::Sync,
            AuditDurability::Async => audit::Durability::Async,
        },
        sign_each_entry: cfg.audit.sign_each_entry,
        queue_capacity: cfg.audit.queue_capacity,
        key_name: key_name(cfg),
    }
}

/// Records the start: a `startup` entry (with the budget actions replayed from the log) and the
/// `config` entry of the policies loaded.
async fn record_start(opened: &state::Opened, set: &config::PolicySet) -> Result<()> {
    let handle = opened.log.handle();
    let mut startup = Map::new();
    startup.insert("kind".into(), json!("startup"));
    startup.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    startup.insert("tree_size".into(), json!(handle.tree_size().to_string()));
    if let Some(counted) = opened.replayed {
        startup.insert("budget_actions_replayed".into(), json!(counted.to_string()));
    }
    handle.append(startup).await.map_err(|e| anyhow!("writing the startup entry: {e}"))?;
    handle.append(config_entry(set, "load")).await.map_err(|e| anyhow!("writing the config entry: {e}"))?;
    Ok(())
}

/// The upstream client and its SSRF guard, which refuses the gateway's own listeners.
fn upstream_client(cfg: &GatewayConfig, listeners: &Listeners) -> Result<(upstream::UpstreamClient, Vetter)> {
    let roots = upstream::root_store(&cfg.tls.extra_upstream_roots).map_err(|e| anyhow!(e))?;
    let tls = upstream::tls_config(roots).map_err(|e| anyhow!("{e}"))?;
    let vetter = Vetter::new(cfg.allow_private_destinations.clone());
    let client = upstream::build_client(vetter.clone(), tls, cfg.limits.upstream_connect_timeout);
    for a in listeners.own() {
        vetter.add_own_listener(a);
    }
    Ok((client, vetter))
}

/// Request spans (`telemetry.otlp`), or only the callers' trace ids when off.
fn telemetry(cfg: &GatewayConfig, metrics: &crate::metrics::Metrics) -> Result<crate::telemetry::Telemetry> {
    let Some(otlp) = &cfg.otlp else { return Ok(crate::telemetry::Telemetry::off()) };
    let t = crate::telemetry::Telemetry::start(otlp, &cfg.tls.extra_upstream_roots, metrics.spans.clone())
        .map_err(|e| anyhow!(e))?;
    tracing::info!(endpoint = %otlp.endpoint, protocol = ?otlp.protocol, "exporting request spans (telemetry.otlp)");
    Ok(t)
}

/// Rate limits in this process, or in Redis (`rate_limits.backend`).
async fn rate_limiters(cfg: &GatewayConfig, metrics: &crate::metrics::Metrics) -> Result<RateLimiters> {
    Ok(match &cfg.rate_limits {
        config::RateLimitBackend::Local => RateLimiters::new(),
        config::RateLimitBackend::Redis(r) => RateLimiters::redis(
            crate::limits::rate_redis::RedisLimiters::start(r, metrics.state.clone()).await.map_err(|e| anyhow!(e))?,
        ),
    })
}

/// The admin listener's own state, ready: listeners bound, policy and keys loaded, the log
/// re-verified against its checkpoint when it was opened. Ready before the first connection is
/// served (connections may already be waiting in the listeners' backlog).
fn admin_state(gw: &App) -> Arc<AdminState> {
    let health = Arc::new(AdminState::default());
    *health.key_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(hex::encode(gw.key_id()));
    *health.verified.lock().unwrap_or_else(|e| e.into_inner()) = Some((
        crate::clock::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        gw.audit().tree_size(),
    ));
    health.ready.store(true, Ordering::SeqCst);
    health
}

/// Every minute: keeps rate-limiter memory bounded, gives back reservations never forwarded,
/// forgets idle refusal budgets.
async fn sweep_loop(gw: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {
                gw.rate_limits().sweep();
                // Nothing between reserve and forward waits this long (an escalation gives its
                // reservation back before it waits).
                let stale = gw.config().limits.body_read_timeout + Duration::from_secs(120);
                gw.budgets().expire_unforwarded(stale).await;
                gw.refusals().sweep(crate::clock::instant());
            }
            _ = shutdown.changed() => break,
        }
    }
}

/// Refusals beyond an agent's refusal budget: one summary entry per agent, at most once a second
/// (the last ones are written at shutdown).
async fn refusal_summary_loop(gw: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => flush_refusals(&gw).await,
            _ = shutdown.changed() => break,
        }
    }
}

/// Hot reload: polls the policies directory (a ConfigMap update is a `..data` symlink swap, which
/// no write event reports reliably) and reloads on SIGHUP.
async fn reload_loop(gw: Arc<App>, health: Arc<AdminState>, mut shutdown: watch::Receiver<bool>) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let watched = |gw: &App| gw.policies().load().set.watched_files();
    let mut last = fingerprint(&gw.config().policies_dir, &watched(&gw));
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => false,
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = shutdown.changed() => break,
        };
        let now = fingerprint(&gw.config().policies_dir, &watched(&gw));
        if forced || now != last {
            reload(&gw, &health, if forced { "sighup" } else { "change" }).await;
            // What the new set reads may differ from what the old one did.
            last = fingerprint(&gw.config().policies_dir, &watched(&gw));
        }
    }
}

/// Pending approvals past their TTL become expired, with an audit entry.
async fn approval_expiry_loop(gw: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(15)) => gw.approvals().expire_due(gw.audit()).await,
            _ = shutdown.changed() => break,
        }
    }
}

/// The fleet: held requests wake on decisions made on other gateways (a NOTIFY, else the next
/// poll within 250 ms), and readiness follows the database even while no request comes.
async fn fleet_loop(gw: Arc<App>, db: state::postgres::Db, mut shutdown: watch::Receiver<bool>) {
    let decided = Arc::new(tokio::sync::Notify::new());
    let (db2, d2) = (db.clone(), decided.clone());
    let listener = tokio::spawn(async move {
        db2.listen(state::postgres::APPROVALS_CHANNEL, move |_| d2.notify_one()).await;
    });
    let mut n = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                n = n.wrapping_add(1);
                if n.is_multiple_of(4) {
                    let _ = db.ping().await;
                }
            }
            _ = decided.notified() => {}
            _ = shutdown.changed() => break,
        }
        gw.approvals().poll_fleet().await;
    }
    listener.abort();
}

/// Loads the interception CA, generating a development CA in `data_dir` when none exists and
/// the gateway is not running in a pod.
fn interception_ca(cfg: &GatewayConfig) -> Result<Option<proxy::tls::LeafCache>> {
    let (cert, key) = (&cfg.tls.ca_cert, &cfg.tls.ca_key);
    if !cert.exists() && !key.exists() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            tracing::warn!("no interception CA configured (tls.ca_cert): CONNECT to intercept connectors is refused");
            return Ok(None);
        }
        proxy::tls::generate_ca(cert, key).map_err(|e| anyhow!(e))?;
        tracing::warn!(
            cert = %cert.display(),
            "GENERATED A NEW DEVELOPMENT INTERCEPTION CA: agents must trust this certificate; for production provide tls.ca_cert/ca_key"
        );
    }
    proxy::tls::LeafCache::load(cert, key, cfg.tls.leaf_ttl).map(Some).map_err(|e| anyhow!(e))
}

/// The IPv6 address that mirrors an IPv4 transparent listener: `[::]` for `0.0.0.0`, `[::1]`
/// for loopback, on the same port; none for a specific IPv4 address.
fn ipv6_twin(a: SocketAddr) -> Option<SocketAddr> {
    match a.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
            Some(SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), a.port()))
        }
        std::net::IpAddr::V4(v4) if v4.is_loopback() => {
            Some(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), a.port()))
        }
        _ => None,
    }
}

/// Binds an IPv6-only listener (the IPv4 side already has its own socket on the same port).
fn bind_ipv6_only(a: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_only_v6(true)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&a.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Writes the pending refusal summaries (`limits::refusals`), one `decision` entry each.
async fn flush_refusals(gw: &App) {
    for summary in gw.refusals().drain() {
        let appended = match summary.entry() {
            Ok(fields) => gw.audit().append_fields(fields).await,
            Err(e) => Err(e),
        };
        if let Err(e) = appended {
            tracing::error!(error = %e, count = summary.count, "refusal summary not recorded");
        }
    }
}

/// Accept loop of the transparent listener (one per address family). Past the cap a new
/// connection is closed: it may be TLS, so no HTTP answer fits.
async fn serve_transparent(
    listener: TcpListener,
    gw: Arc<App>,
    own: Vec<SocketAddr>,
    slots: conn::Slots,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut acceptor = Acceptor::new(listener);
    let mut full = Repeated::new("limits.max_connections reached; closing new transparent connections");
    loop {
        tokio::select! {
            stream = acceptor.accept() => {
                let Some(slot) = slots.try_take() else {
                    full.note(&format_args!("{} connections open", slots.in_use()));
                    continue;
                };
                full.clear();
                let _ = stream.set_nodelay(true);
                let (gw, own) = (gw.clone(), own.clone());
                tokio::spawn(proxy::transparent::serve_connection(gw, stream, own, slot));
            }
            _ = shutdown.changed() => break,
        }
    }
}

/// Accept loop shared by the listeners: bounded connections (a fast 503 past the cap),
/// connection deadlines, graceful drain on shutdown.
async fn serve<S, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    svc: S,
    slots: conn::Slots,
    cap_key: &'static str,
    timeouts: conn::ConnTimeouts,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Fn(http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<http::Response<proxy::ProxyBody>, Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut acceptor = Acceptor::new(listener);
    let mut full = Repeated::new("connection cap reached; answering new connections 503 too_many_connections");
    let writers = Arc::new(Semaphore::new(OVERLOAD_WRITERS));
    let reply = Arc::new(conn::overloaded_response(cap_key));
    loop {
        tokio::select! {
            stream = acceptor.accept() => {
                let Some(slot) = slots.try_take() else {
                    full.note(&format_args!("{} connections open", slots.in_use()));
                    refuse_connection(stream, &writers, &reply);
                    continue;
                };
                full.clear();
                let _ = stream.set_nodelay(true);
                let act = conn::Activity::new();
                let svc = conn::track(svc.clone(), act.clone(), Some(slot));
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service_fn(svc))
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        _ = conn::watchdog(&act, timeouts) => {}
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(acceptor);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
}

/// A cheap digest of the manifest files' contents and of the files they read (issuer keys,
/// credentials), read through their paths, so a kubelet `..data` swap of a mounted Secret or
/// ConfigMap shows as a change.
fn fingerprint(dir: &std::path::Path, watched: &[std::path::PathBuf]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in config::manifest_files(dir).unwrap_or_default().iter().chain(watched) {
        h.update(f.to_string_lossy().as_bytes());
        match std::fs::read(f) {
            Ok(b) => {
                h.update(b"=");
                h.update(Sha256::digest(b));
            }
            Err(_) => h.update(b"!"),
        }
    }
    hex::encode(h.finalize())
}

/// Reloads the policies: validate fully, record, swap atomically. A manifest that fails keeps
/// its agent's last good version (or, without one, refuses it `manifest_invalid`); the error is
/// counted and shown on `/readyz` until a reload without one.
pub(crate) async fn reload(gw: &App, health: &AdminState, trigger: &str) {
    let dir = gw.config().policies_dir.clone();
    let loaded = tokio::task::spawn_blocking(move || config::load_policies_lenient(&dir, Strictness::Run)).await;
    let mut set = match loaded {
        Ok(Ok(set)) => set,
        Ok(Err(e)) => {
            tracing::error!(trigger, "policy reload rejected; keeping the last good policy:\n{e}");
            gw.metrics().reload("error");
            *health.last_reload_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            return;
        }
        Err(_) => return,
    };
    let old = gw.policies().load_full();
    // A bad file never replaces a good policy: the agent it names keeps its last good manifest.
    for i in &set.invalid {
        if let Some(agent) = &i.agent
            && let Some(good) = old.set.get(agent)
        {
            set.manifests.insert(agent.clone(), good.clone());
        }
    }
    let error = (!set.invalid.is_empty())
        .then(|| config::Diagnostics(set.invalid.iter().flat_map(|i| i.errors.clone()).collect()).to_string());
    if let Some(e) = &error {
        tracing::error!(
            trigger,
            "policy reload: invalid manifests keep their agents' last good policy (or none):\n{e}"
        );
    }
    // Nothing that serves requests changed (only files turned invalid, their agents keeping the
    // last good policy): nothing to record or swap.
    let unchanged = set.digest() == old.set.digest() && set.file_hashes == old.set.file_hashes;
    if unchanged && error.is_some() {
        // The invalid list itself is served (`manifest_invalid`, `/readyz`).
        if !set.invalid.iter().map(|i| &i.file).eq(old.set.invalid.iter().map(|i| &i.file)) {
            gw.policies().store(Arc::new(Policies::new(set)));
        }
        gw.metrics().reload("error");
        *health.last_reload_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        return;
    }
    let mut entry = config_entry(&set, "reload");
    let changes: Vec<Value> = set
        .manifests
        .iter()
        .filter_map(|(id, m)| {
            let before = old.set.get(id).map(|o| o.mode);
            (before.is_some_and(|b| b != m.mode))
                .then(|| json!({"agent": id, "from": before.map(|b| b.as_str()), "to": m.mode.as_str()}))
        })
        .collect();
    entry.insert("mode_changes".into(), Value::Array(changes));
    entry.insert("trigger".into(), json!(trigger));
    if let Err(e) = gw.audit().append(entry).await {
        tracing::error!(error = %e, "policy reload not applied: the config entry could not be recorded");
        gw.metrics().reload("error");
        return;
    }
    for w in &set.warnings {
        tracing::warn!("{w}");
    }
    let n = set.manifests.len();
    gw.policies().store(Arc::new(Policies::new(set)));
    gw.metrics().reload(if error.is_some() { "error" } else { "success" });
    *health.last_reload_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    tracing::info!(trigger, manifests = n, "policies reloaded");
}

impl Running {
    /// Stops accepting, drains in-flight requests (bounded), flushes the audit log.
    pub async fn shutdown(mut self) {
        self.gateway.stop();
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        flush_refusals(&self.gateway).await;
        if let Some(log) = self.audit.take() {
            log.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Backoff, Repeated, effective_max_connections};
    use std::time::Duration;

    #[test]
    fn accept_errors_back_off_from_10_ms_doubling_to_1_s() {
        let mut b = Backoff::new();
        let waits: Vec<u128> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(10));
    }

    #[test]
    fn a_repeated_error_is_logged_once_then_summarised_every_ten_seconds() {
        let mut r = Repeated::new("accept failed");
        let t0 = crate::clock::instant();
        assert_eq!(r.tally(t0), Some(0), "the first occurrence is logged");
        // 364 more within 10 s: no line.
        for i in 1..=364u64 {
            assert_eq!(r.tally(t0 + Duration::from_millis(i * 20)), None);
        }
        // The next one after 10 s writes one summary with the count.
        assert_eq!(r.tally(t0 + Duration::from_secs(10)), Some(365));
        assert_eq!(r.tally(t0 + Duration::from_secs(11)), None);
        r.clear();
        assert_eq!(r.tally(t0 + Duration::from_secs(12)), Some(0), "a new episode is logged again");
    }

    #[test]
    fn the_connection_cap_fits_the_open_file_limit_next_to_the_admin_cap() {
        assert_eq!(effective_max_connections(4096, 256, None), 4096);
        assert_eq!(effective_max_connections(4096, 256, Some(1_048_576)), 4096);
        // 1024 descriptors: 64 reserved, 256 for admin, two per agent connection.
        assert_eq!(effective_max_connections(4096, 256, Some(1024)), 352);
        assert_eq!(effective_max_connections(100, 256, Some(1024)), 100);
        assert_eq!(effective_max_connections(4096, 256, Some(100)), 1);
    }
}
