//! The validated model: what the running gateway sees. Built only through `load`, so every value
//! here has passed validation.

use ed25519_dalek::VerifyingKey;
use http::{HeaderName, HeaderValue, Method};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------- gateway.yaml

/// The validated `gateway.yaml`: listeners, files, the audit log, state backend, identity, admin
/// keys, limits and telemetry. Every key is optional; the defaults are those of
/// docs/configuration.md.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Base-URL and explicit-proxy listener.
    pub proxy_listener: SocketAddr,
    /// Transparent listener (iptables REDIRECT target), off unless configured.
    pub transparent_listener: Option<SocketAddr>,
    /// AdminState, metrics, admin API.
    pub admin_listener: SocketAddr,
    /// Directory of manifests.
    pub policies_dir: PathBuf,
    /// Where dev keys, the CA and the audit log live by default.
    pub data_dir: PathBuf,
    /// Ed25519 PKCS#8 key that signs checkpoints and override tokens.
    pub gateway_key: PathBuf,
    /// `tls`: the interception CA, extra upstream roots and the leaf lifetime.
    pub tls: TlsSettings,
    /// `audit`: the audit log's file, name, durability and queue.
    pub audit: AuditSettings,
    /// `state.backend`: embedded (redb, one gateway) or a fleet's PostgreSQL (SPEC §15).
    pub state: StateBackend,
    /// `identity`: who a request that carries no capability token is.
    pub identity: IdentitySettings,
    /// `admin.keys`: the admin API keys, by SHA-256 and role. Empty: every admin API call that
    /// needs a key is refused 401.
    pub admin_keys: Vec<AdminKey>,
    /// `admin.max_connections`: the admin listener's own connection cap, so health checks
    /// answer while the proxy listener is flooded.
    pub admin_max_connections: usize,
    /// `limits`: request sizes, timeouts and connection caps of the data path.
    pub limits: Limits,
    /// CIDRs that may be dialled despite the SSRF guard.
    pub allow_private_destinations: Vec<Cidr>,
    /// `log_format`: how the gateway's own log lines on stderr are written (`--log-format`
    /// overrides it).
    pub log_format: LogFormat,
    /// `telemetry.otlp`: where request spans are exported (off when `None`).
    pub otlp: Option<OtlpSettings>,
    /// `rate_limits.backend`: where the rate-limit state of the manifests lives.
    pub rate_limits: RateLimitBackend,
}

/// `rate_limits.backend` (SPEC §15.1).
#[derive(Debug, Clone, Default)]
pub enum RateLimitBackend {
    /// Per gateway, in memory (the governor crate): each gateway enforces each limit on its own.
    #[default]
    Local,
    /// One state per limit for every gateway sharing the Redis server.
    Redis(RedisSettings),
}

/// `rate_limits.redis`.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL, read from `url_file` or given inline as `url`.
    pub url: SecretUrl,
    /// Bound on one rate-limit round trip (and on connecting); beyond it the request fails closed.
    pub timeout: Duration,
    /// PEM roots trusted for `rediss://` instead of the built-in web roots.
    pub ca_file: Option<PathBuf>,
}

/// A URL that may carry a password: shown (`Debug`, `Display`) with the password as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub(crate) fn new(url: String) -> SecretUrl {
        SecretUrl(url)
    }

    /// The URL itself, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the URL carries a password.
    pub(crate) fn has_password(&self) -> bool {
        url::Url::parse(&self.0).is_ok_and(|u| u.password().is_some())
    }

    /// The URL with its password replaced by `***` (unparsable: nothing of it is shown).
    pub(crate) fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            }
            Err(_) => "<invalid URL>".to_string(),
        }
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// How OpenTelemetry traces leave the gateway (`telemetry.otlp`).
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// The collector: for `http`, the full `/v1/traces` URL (appended when the endpoint has no
    /// path); for `grpc`, the collector's origin.
    pub endpoint: String,
    /// `telemetry.otlp.protocol`: `http` (the default; `http/protobuf` is accepted too) or `grpc`.
    pub protocol: OtlpProtocol,
    /// Bound on one export; a collector slower than this loses that batch (counted).
    pub timeout: Duration,
    /// Spans waiting for export; beyond it new spans are dropped (counted), never waited for.
    pub queue_size: usize,
}

/// How spans are sent to the collector (`telemetry.otlp.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies.
    Http,
    /// OTLP/gRPC.
    Grpc,
}

/// `tls`: the CA that signs interception leaves, and the roots trusted for upstreams.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// `tls.ca_cert`: the interception CA certificate, PEM (default `DATA_DIR/ca.pem`; generated
    /// there if absent, except in a pod).
    pub ca_cert: PathBuf,
    /// `tls.ca_key`: the CA's private key, PKCS#8 PEM (default `DATA_DIR/ca-key.pem`, mode 0600).
    pub ca_key: PathBuf,
    /// PEM files whose certificates are trusted for upstream TLS in addition to webpki roots.
    pub extra_upstream_roots: Vec<PathBuf>,
    /// `tls.leaf_ttl`: validity of each minted leaf certificate (default 24 h); a leaf is served
    /// from the cache for half of it.
    pub leaf_ttl: Duration,
}

/// `audit.durability`: whether a decision is fsynced before its request goes on. With
/// `state.backend: postgres` it is PostgreSQL's synchronous commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditDurability {
    /// The decision entry is fsynced before the request is forwarded.
    Sync,
    /// Entries are committed without waiting for fsync.
    Async,
}

/// `audit`: the audit log (with `state.backend: postgres`, the fleet's log in the database).
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// `audit.path`: the redb file of the log (default `DATA_DIR/audit.redb`, mode 0600); not used
    /// with `state.backend: postgres`.
    pub path: PathBuf,
    /// Log name written in every checkpoint.
    pub origin: String,
    /// `audit.durability`: `sync` (the default) or `async`.
    pub durability: AuditDurability,
    /// `audit.sign_each_entry`: also an Ed25519 signature on every entry (default false).
    pub sign_each_entry: bool,
    /// A full queue answers 503 (fail closed).
    pub queue_capacity: usize,
}

/// Where the policy state and the log live (SPEC §15.1).
#[derive(Debug, Clone, Default)]
pub enum StateBackend {
    /// One gateway: the redb file at `audit.path`.
    #[default]
    Embedded,
    /// A fleet: PostgreSQL shared by every gateway with the same `audit.origin`.
    Postgres(PostgresSettings),
}

/// `state.postgres`.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// `state.postgres.url_file` or `state.postgres.url` (exactly one): the `postgres://` URL; its
    /// `sslmode` decides TLS.
    pub url: SecretSource,
    /// `state.postgres.pool_size`: connections per gateway (default 8, at least 2: the log's writer
    /// keeps one).
    pub pool_size: usize,
    /// `state.postgres.connect_timeout`: a connection (or a free pooled one) not obtained within
    /// this fails closed (default 2 s).
    pub connect_timeout: Duration,
    /// Any statement or lock wait beyond it fails (closed).
    pub statement_timeout: Duration,
    /// Roots for `sslmode=verify-full` (else the bundled web roots).
    pub ca_file: Option<PathBuf>,
}

/// A connection URL that carries a password: read from a file (a mounted Secret) when the
/// gateway starts, or written inline. Never printed with its password.
#[derive(Clone)]
pub enum SecretSource {
    /// `url_file`: the file that holds the URL, read (and trimmed) when the gateway starts.
    File(PathBuf),
    /// `url`: the URL written in `gateway.yaml` itself.
    Inline(String),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "File({})", p.display()),
            SecretSource::Inline(u) => write!(f, "Inline({})", redact_url(u)),
        }
    }
}

impl SecretSource {
    /// The URL, read from its file now (trimmed).
    pub(crate) fn read(&self) -> Result<String, String> {
        match self {
            SecretSource::Inline(u) => Ok(u.clone()),
            SecretSource::File(p) => {
                std::fs::read_to_string(p).map(|s| s.trim().to_string()).map_err(|e| format!("{}: {e}", p.display()))
            }
        }
    }
}

/// A URL with its password (if any) shown as `***`; text that is no URL is hidden whole.
pub(crate) fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let mut q: Vec<(String, String)> = u.query_pairs().into_owned().collect();
            if q.iter().any(|(k, _)| k.eq_ignore_ascii_case("password")) {
                for (k, v) in &mut q {
                    if k.eq_ignore_ascii_case("password") {
                        *v = "***".into();
                    }
                }
                u.query_pairs_mut().clear().extend_pairs(q);
            }
            u.to_string()
        }
        Err(_) => "***".into(),
    }
}

/// `identity`: the identity of requests that carry no capability token.
#[derive(Debug, Clone, Default)]
pub struct IdentitySettings {
    /// Agent id for requests that carry no token (the pod's identity).
    pub default_agent: Option<String>,
    /// A capability token the gateway presents on the agent's behalf.
    pub token_file: Option<PathBuf>,
}

/// What an approval entry's `by` holds for the events the gateway makes by itself (created,
/// expired, consumed, override_issued); approve and deny hold the admin key's id, so no admin
/// key may take this id.
pub(crate) const BY_GATEWAY: &str = "gateway";

/// Admin roles, in order: each role may do everything the roles before it may. Reading grows
/// from viewer (records, checkpoint, proofs, stream, approvals, manifests) to auditor (also the
/// export bundle); approver adds approve/deny, admin everything. An auditor never approves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AdminRole {
    /// Reads approvals, records, the record stream, checkpoints, proofs and manifests.
    Viewer,
    /// A viewer that may also export the evidence bundle; never approves or changes anything.
    Auditor,
    /// An auditor that may also approve and deny pending approvals.
    Approver,
    /// Everything the admin API offers.
    Admin,
}

/// `admin.keys[]`: one admin API key, known to the gateway only by its SHA-256.
#[derive(Clone)]
pub struct AdminKey {
    /// `id`: names the key in the `by` field of the approval entries it makes; unique, and never
    /// `gateway` (reserved for the gateway's own events).
    pub id: String,
    /// `sha256`: SHA-256 of the key as presented in `Authorization: Bearer` (64 hex digits in the
    /// file).
    pub sha256: [u8; 32],
    /// `role`: `viewer`, `auditor`, `approver` or `admin`.
    pub role: AdminRole,
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminKey({}, {:?})", self.id, self.role)
    }
}

/// `limits`: sizes, timeouts and connection caps of the proxy and transparent listeners.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `limits.max_header_bytes`: the largest request head, in bytes (default 65536, at least
    /// 1024).
    pub max_header_bytes: usize,
    /// Bodies buffered for body params are capped at this size (else 413).
    pub max_body_bytes: usize,
    /// A body whose declared length is at most this is read and hashed before its decision is
    /// recorded (its hash is in the `decision` entry whatever happens next); longer or chunked
    /// bodies stream and are hashed on the way (in the `outcome` entry). At most `max_body_bytes`.
    pub hash_before_forward: usize,
    /// `limits.header_read_timeout`: a request head not complete within this is dropped
    /// (default 10 s); also the deadline to tell TLS from HTTP on the transparent listener.
    pub header_read_timeout: Duration,
    /// A body the gateway buffers (for body params) must arrive within this time (else 408).
    pub body_read_timeout: Duration,
    /// `limits.upstream_connect_timeout`: bound on connecting to an upstream (default 5 s).
    pub upstream_connect_timeout: Duration,
    /// `limits.upstream_timeout`: bound on waiting for an upstream's response, else 504
    /// `upstream_timeout` (default 60 s).
    pub upstream_timeout: Duration,
    /// Open connections on the proxy and transparent listeners together, CONNECT tunnels and
    /// upgraded connections included; past it new connections get a fast 503 or are closed.
    pub max_connections: usize,
    /// Requests of one identified agent in flight at once (from identification until the
    /// response body ends); beyond, 429 `too_many_requests_in_flight` and the connection is
    /// closed. `None`: half of `max_connections` as applied (after the open-file limit).
    pub max_in_flight_per_agent: Option<usize>,
    /// A connection with no request in flight (HTTP/1 keep-alive, HTTP/2 without streams) is
    /// closed after this long.
    pub idle_timeout: Duration,
    /// Interception and transparent TLS handshakes must complete within this time.
    pub tls_handshake_timeout: Duration,
    /// Passthrough tunnels and upgraded connections (WebSockets) with no bytes either way are
    /// closed after this long.
    pub tunnel_idle_timeout: Duration,
    /// Refusals recorded one by one per agent (or per listener for unidentified clients):
    /// `refusals_per_second` sustained, `refusals_burst` at once; beyond, refusals are answered
    /// 429 and counted into a per-agent summary entry.
    pub refusals_per_second: f64,
    /// `limits.refusals_burst`: refusals recorded one by one at once, on top of the sustained
    /// `refusals_per_second` (default 100, at least 1).
    pub refusals_burst: u32,
    /// After the agent goes away mid-response, an LLM response (a connector with `usage`) is
    /// read on for at most this long (and `USAGE_DRAIN_MAX_BYTES`) to learn its token usage.
    pub usage_drain_timeout: Duration,
}

/// At most this much of an LLM response is read after the agent went away (SPEC §16.1).
pub(crate) const USAGE_DRAIN_MAX_BYTES: u64 = 1 << 20;

/// Tokens reserved by default for an LLM call that declares no output limit (SPEC §16.1).
pub(crate) const DEFAULT_USAGE_ESTIMATE: u64 = 4096;

/// `log_format`: the format of the gateway's own log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (the default).
    Json,
    /// Human-readable text lines.
    Text,
}

/// An IP network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address as written; host bits beyond `prefix` are ignored when matching.
    pub addr: IpAddr,
    /// Prefix length in bits: up to 32 for IPv4, 128 for IPv6 (the full width when no `/` is
    /// written).
    pub prefix: u8,
}

impl Cidr {
    pub(crate) fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse().ok().filter(|&n| n <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 { 0 } else { bits >> (width - prefix) }
        }
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n) as u128, self.prefix, 32) == masked(u32::from(a) as u128, self.prefix, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), self.prefix, 128) == masked(u128::from(a), self.prefix, 128)
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------- manifest

/// One agent's manifest, validated.
#[derive(Debug)]
pub struct Manifest {
    /// `agent`: the agent's id and descriptive fields.
    pub agent: AgentInfo,
    /// `mode`: `enforce` (the default) or `dry_run`.
    pub mode: PolicyMode,
    /// `capability`: the capability tokens the agent's requests are verified against.
    pub capability: CapabilityPolicy,
    /// `connectors`: the upstreams the agent may reach, in file order (requests by host go to the
    /// first that matches).
    pub connectors: Vec<Arc<Connector>>,
    /// `policy`: the lists, caps, approval triggers, budgets and rate limits requests are decided
    /// by.
    pub policy: Policy,
    /// `escalation`: how ESCALATE decisions wait for a human.
    pub escalation: Escalation,
    /// `audit`: what of each request's body and headers is recorded.
    pub audit: ManifestAudit,
    /// SHA-256 (hex) of the manifest file bytes.
    pub sha256: String,
    /// The manifest file it was loaded from.
    pub source: PathBuf,
    /// The other files it reads (issuer key files, `${file:…}` credentials), sorted: watched
    /// for changes like the manifest itself.
    pub files: Vec<PathBuf>,
}

impl Manifest {
    pub(crate) fn connector(&self, name: &str) -> Option<&Arc<Connector>> {
        self.connectors.iter().find(|c| c.name == name)
    }
}

/// `agent`: who the manifest is for.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// `agent.id`: the agent id (`^[a-z0-9][a-z0-9-]{2,62}$`), unique across the manifests; a
    /// token's `sub` picks the manifest by it.
    pub id: String,
    /// `agent.name`: a display name, informational only.
    pub name: Option<String>,
    /// `agent.owner`: who is responsible for the agent, informational only.
    pub owner: Option<String>,
    /// `agent.description`: free text about the agent, informational only.
    pub description: Option<String>,
}

/// `mode`: whether the manifest's decisions are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyMode {
    /// Refusals and escalations are answered as decided (the default).
    Enforce,
    /// Record would-be decisions, forward anyway.
    DryRun,
}

impl PolicyMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Enforce => "enforce",
            PolicyMode::DryRun => "dry_run",
        }
    }
}

/// `capability.issuers[]`: an issuer whose capability tokens the agent may present.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// `id`: what a token's `iss` names; unique within the manifest.
    pub id: String,
    /// The issuer's Ed25519 public key, from `public_key_file` or the inline SPKI PEM `public_key`.
    pub key: VerifyingKey,
}

/// `capability`: which capability tokens the agent's requests must carry and who may issue them.
#[derive(Debug, Clone)]
pub struct CapabilityPolicy {
    /// No valid token → deny.
    pub required: bool,
    /// `capability.audience`: a value a token's `aud` must contain (default `uapk-gateway`).
    pub audience: String,
    /// `capability.max_lifetime`: the longest `exp - iat` accepted (default 24 h); above it the
    /// token is `capability_token_invalid`.
    pub max_lifetime: Duration,
    /// Clock skew allowed on `exp`, `nbf` and `iat` (`capability.leeway`, default 60 s).
    pub leeway: Duration,
    /// `capability.issuers`: the keys tokens may be signed with; a token whose `iss` names no
    /// issuer here is invalid.
    pub issuers: Vec<Issuer>,
    /// `capability.revoked`: token ids (`jti`) refused `capability_token_revoked`.
    pub revoked: HashSet<String>,
}

/// A connector's `tls`: what happens to TLS connections (CONNECT tunnels, transparent) to its
/// hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Decrypted with a leaf from the gateway's CA; every request inside is decided (the default).
    Intercept,
    /// Host and port checked, then bytes spliced unread; one outcome record per tunnel.
    Passthrough,
}

/// Which LLM API's token usage a connector reads from its responses (SPEC §14.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageFormat {
    /// OpenAI chat completions / responses: `usage.prompt_tokens`, `completion_tokens`.
    OpenAi,
    /// Anthropic messages: `usage.input_tokens`, `output_tokens`.
    Anthropic,
}

/// A named upstream: the hosts and ports an agent may reach through it, and its routes.
#[derive(Debug)]
pub struct Connector {
    /// `name`: the connector's name, unique within the manifest and never `uapk`; base-URL mode
    /// serves it at `/NAME/…` on the proxy listener.
    pub name: String,
    /// `base_url`: the upstream base-URL mode forwards to. `None`: the connector is reachable only
    /// as a proxy target (CONNECT, absolute-form, transparent).
    pub base_url: Option<BaseUrl>,
    /// Exact lower-case names or `*.suffix` patterns.
    pub hosts: Vec<String>,
    /// `ports`: ports a CONNECT or transparent connection may name (default the `base_url` port,
    /// else 443).
    pub ports: Vec<u16>,
    /// `tls`: `intercept` (the default) or `passthrough`.
    pub tls: TlsMode,
    /// Resolved credentials, or why the connector is unavailable (never the secret itself).
    pub credentials: Result<Vec<(HeaderName, HeaderValue)>, String>,
    /// Agent-supplied headers removed before forwarding (`strip_headers`), on top of the
    /// credential headers every connector with `credentials` strips.
    pub strip_headers: Vec<HeaderName>,
    /// Token usage read from responses (`usage`), recorded in outcome entries.
    pub usage: Option<UsageFormat>,
    /// Output tokens reserved for a call that declares no limit (`usage_estimate`, SPEC §16.1);
    /// the request body's length / 4 is added for its input.
    pub usage_estimate: u64,
    /// `routes`: the requests the connector serves; first match wins, no match is
    /// `route_not_allowed`. Empty for MCP connectors.
    pub routes: Vec<Route>,
    /// Set for `protocol: mcp` connectors (which have tools instead of routes).
    pub mcp: Option<McpEndpoint>,
}

/// An MCP connector's endpoint (JSON-RPC 2.0 over streamable HTTP): each JSON-RPC request
/// posted to `path` is one decision.
#[derive(Debug)]
pub struct McpEndpoint {
    /// The upstream path of the endpoint: the base URL's path prefix and `mcp_path`.
    pub path: String,
    /// `tools/call` rules, first match wins.
    pub tools: Vec<McpTool>,
}

/// `tools[]` of an MCP connector: which `tools/call` requests it matches and the action they are.
#[derive(Debug)]
pub struct McpTool {
    /// The exact tool name; `None` for `*`.
    pub name: Option<String>,
    /// The tool's action and params; `json` pointers already point into the JSON-RPC request
    /// (below `/params/arguments`), so params are read from the body like a route's.
    pub rule: Route,
}

impl Connector {
    /// Every rule that reads params: the routes, and an MCP connector's tools.
    pub(crate) fn rules(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().chain(self.mcp.iter().flat_map(|m| m.tools.iter().map(|t| &t.rule)))
    }
    /// Whether the connector injects credentials (configured, even if a source is missing).
    pub(crate) fn injects_credentials(&self) -> bool {
        self.credentials.as_ref().map_or(true, |c| !c.is_empty())
    }
    pub(crate) fn matches_host(&self, host: &str) -> bool {
        // One trailing dot names the same host (`api.example.com.`); two are no host name.
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() || host.ends_with('.') {
            return false;
        }
        // IP literals compare as addresses (`::ffff:127.0.0.1` is `::ffff:7f00:1`).
        let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        self.hosts.iter().any(|p| match p.strip_prefix("*.") {
            _ if ip.is_some() => p.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok() == ip,
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => p.eq_ignore_ascii_case(host),
        })
    }

    pub(crate) fn matches_port(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// First route that matches the method and upstream path, with its captured path params.
    pub(crate) fn route(&self, method: &Method, path: &str) -> Option<(&Route, Vec<(String, String)>)> {
        self.routes.iter().find_map(|r| {
            if !r.methods.is_empty() && !r.methods.contains(method) {
                return None;
            }
            r.path.matches(path).map(|caps| (r, caps))
        })
    }
}

/// A connector's `base_url`, parsed.
#[derive(Debug, Clone)]
pub struct BaseUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// The host, lower-case, without a trailing dot (an IPv6 literal without brackets).
    pub host: String,
    /// The port written in the URL, else the scheme's default.
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub path_prefix: String,
}

/// The scheme of a connector's `base_url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// `routes[]`: which requests of a connector it matches, their action type and the params read from
/// them.
#[derive(Debug, Clone)]
pub struct Route {
    /// Empty = any method.
    pub methods: Vec<Method>,
    /// `path`: the upstream path pattern, the `base_url` path prefix included.
    pub path: PathPattern,
    /// `action`: the action type of matching requests, e.g. `payment.refund`.
    pub action: String,
    /// `params`: the declared params and where each is read from.
    pub params: Vec<ParamSpec>,
    /// Bodies of this route may be recorded in full.
    pub safe: bool,
}

impl Route {
    /// The route reads params from the body, so the body must be buffered.
    pub(crate) fn needs_body(&self) -> bool {
        self.body_format().is_some()
    }

    /// The body media type the route's body params are read from (validation refuses a route
    /// that mixes `json` and `form` sources).
    pub(crate) fn body_format(&self) -> Option<BodyFormat> {
        self.params.iter().find_map(|p| match p.source {
            ParamSource::Json(_) => Some(BodyFormat::Json),
            ParamSource::Form(_) => Some(BodyFormat::Form),
            _ => None,
        })
    }

    /// The route declares a param of this name.
    pub(crate) fn declares(&self, name: &str) -> bool {
        self.params.iter().any(|p| p.name == name)
    }
}

/// How a body is encoded, decided by its media type as the upstream decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFormat {
    /// `application/json` or `*/*+json`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
}

impl BodyFormat {
    pub(crate) fn media_type(self) -> &'static str {
        match self {
            BodyFormat::Json => "application/json",
            BodyFormat::Form => "application/x-www-form-urlencoded",
        }
    }
}

/// One segment of a route's path pattern.
#[derive(Debug, Clone, PartialEq)]
pub enum PathSeg {
    /// A segment that must appear exactly as written.
    Literal(String),
    /// `*`: exactly one segment.
    Any,
    /// `**`: the rest of the path (zero or more segments); last only.
    Rest,
    /// `{name}`: one segment, captured as a param.
    Capture(String),
}

/// A route's `path`, parsed into segments.
#[derive(Debug, Clone)]
pub struct PathPattern {
    /// The pattern as written; recorded as the `route` of decision entries.
    pub raw: String,
    /// Its segments, in order (`/` alone has none).
    pub segs: Vec<PathSeg>,
}

impl PathPattern {
    /// Parses a route's `path`: it starts with `/`; segments are literal, `*`, `{name}` or a final
    /// `**`. The error says what is wrong with it.
    pub fn parse(raw: &str) -> Result<PathPattern, String> {
        let Some(rest) = raw.strip_prefix('/') else {
            return Err("must start with '/'".into());
        };
        let mut segs = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split('/').collect() };
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "**" if i + 1 == parts.len() => PathSeg::Rest,
                "**" => return Err("'**' is only allowed as the last segment".into()),
                "*" => PathSeg::Any,
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return Err(format!("invalid capture name {name:?}"));
                    }
                    PathSeg::Capture(name.to_string())
                }
                p if p.contains(['*', '{', '}']) => return Err(format!("invalid segment {p:?}")),
                p => PathSeg::Literal(p.to_string()),
            };
            segs.push(seg);
        }
        Ok(PathPattern { raw: raw.to_string(), segs })
    }

    /// Matches an upstream path (without query); returns captures.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let rest = path.strip_prefix('/')?;
        let parts: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split('/').collect() };
        let mut caps = Vec::new();
        for (i, seg) in self.segs.iter().enumerate() {
            match seg {
                PathSeg::Rest => return Some(caps),
                _ if i >= parts.len() => return None,
                PathSeg::Literal(l) if l != parts[i] => return None,
                PathSeg::Literal(_) => {}
                PathSeg::Any if parts[i].is_empty() => return None,
                PathSeg::Any => {}
                PathSeg::Capture(_) if parts[i].is_empty() => return None,
                PathSeg::Capture(n) => caps.push((n.clone(), parts[i].to_string())),
            }
        }
        (parts.len() == self.segs.len()).then_some(caps)
    }

    pub(crate) fn captures(&self) -> impl Iterator<Item = &str> {
        self.segs.iter().filter_map(|s| match s {
            PathSeg::Capture(n) => Some(n.as_str()),
            _ => None,
        })
    }
}

/// Where a route's param is read from (exactly one source per param).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamSource {
    /// JSON pointer into an `application/json` / `*/*+json` body.
    Json(String),
    /// Key of an `application/x-www-form-urlencoded` body (after percent-decoding).
    Form(String),
    /// `header`: a request header, by name.
    Header(HeaderName),
    /// `query`: a query parameter, by name.
    Query(String),
    /// `path`: a `{name}` segment the route's path captures, by name.
    Path(String),
    /// A fixed value written in the manifest.
    Value(String),
}

/// `routes[].params.NAME`: one declared param.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// The param's name; `amount`, `currency`, `counterparty` and `jurisdiction` have a meaning to
    /// the policy.
    pub name: String,
    /// Where the value is read from.
    pub source: ParamSource,
    /// Minor-unit scale: the integer 1234 with scale 2 is 12.34.
    pub scale: Option<u32>,
}

/// Allow and deny lists; deny wins, an empty allow list allows everything.
#[derive(Debug, Clone, Default)]
pub struct AllowDeny {
    /// Entries allowed, exact or `prefix*`; empty: everything the deny list does not name.
    pub allow: Vec<String>,
    /// Entries refused, exact or `prefix*`, even when the allow list names them.
    pub deny: Vec<String>,
}

impl AllowDeny {
    fn hit(list: &[String], v: &str, fold_case: bool) -> bool {
        let eq = |a: &str, b: &str| if fold_case { a.eq_ignore_ascii_case(b) } else { a == b };
        list.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => v.get(..prefix.len()).is_some_and(|head| eq(head, prefix)),
            None => eq(p, v),
        })
    }
    /// Names (connectors, action types): exact match.
    pub(crate) fn denies(&self, v: &str) -> bool {
        Self::hit(&self.deny, v, false)
    }
    pub(crate) fn allows(&self, v: &str) -> bool {
        !self.denies(v) && (self.allow.is_empty() || Self::hit(&self.allow, v, false))
    }
    /// Whether `list` (entries exact or `prefix*`) names the value `v`, ASCII case-insensitively.
    pub(crate) fn list_has_value(list: &[String], v: &str) -> bool {
        Self::hit(list, v, true)
    }
    /// Values read from a request (counterparties, jurisdictions, param values): ASCII
    /// case-insensitive, so `CEO@acme.example` is the `ceo@acme.example` of a deny list.
    pub(crate) fn denies_value(&self, v: &str) -> bool {
        Self::hit(&self.deny, v, true)
    }
    pub(crate) fn allows_value(&self, v: &str) -> bool {
        !self.denies_value(v) && (self.allow.is_empty() || Self::hit(&self.allow, v, true))
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// `policy.params.<name>`: what values a declared param may take. Lists match ASCII
/// case-insensitively; `min`/`max` compare decimals (never floats), inclusive.
#[derive(Debug, Clone, Default)]
pub struct ParamConstraint {
    /// `allow` and `deny`: the values the param may and may not take.
    pub values: AllowDeny,
    /// `min`: the smallest value allowed, inclusive (`param_out_of_range` below it).
    pub min: Option<Decimal>,
    /// `max`: the largest value allowed, inclusive (`param_out_of_range` above it).
    pub max: Option<Decimal>,
}

/// Upper-case ISO-4217 code → amount.
pub(crate) type Money = BTreeMap<String, Decimal>;

/// `policy.approval`: what needs a human's approval (an ESCALATE decision).
#[derive(Debug, Clone, Default)]
pub struct Approval {
    /// `policy.approval.action_types`: action types (exact) whose requests escalate
    /// `requires_human_approval`.
    pub action_types: Vec<String>,
    /// `policy.approval.connectors`: connectors (exact names) whose requests escalate
    /// `requires_human_approval`.
    pub connectors: Vec<String>,
    /// `policy.approval.amount_above`: per currency, the amount above which a request escalates
    /// `amount_requires_approval`.
    pub amount_above: Money,
}

/// A budget's `window`: the UTC period its counters cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// UTC calendar day.
    Day,
    /// UTC clock hour.
    Hour,
}

impl Window {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Hour => "hour",
        }
    }
    pub(crate) fn seconds(self) -> i64 {
        match self {
            Window::Day => 86_400,
            Window::Hour => 3_600,
        }
    }
}

/// `scope` of a budget or rate limit: what it counts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One count for the whole agent (the default).
    Agent,
    /// One count per connector.
    Connector,
    /// One count per action type.
    Action,
}

impl Scope {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scope::Agent => "agent",
            Scope::Connector => "connector",
            Scope::Action => "action",
        }
    }
}

/// `policy.budgets[]`: limits on what the agent may do per window (`budget_exceeded` beyond).
#[derive(Debug, Clone)]
pub struct Budget {
    /// `window`: `day` or `hour`.
    pub window: Window,
    /// `scope`: `agent` (the default), `connector` or `action`.
    pub scope: Scope,
    /// `max_actions`: ALLOW decisions per window.
    pub max_actions: Option<u64>,
    /// LLM tokens (recorded `usage.total_tokens`) per window.
    pub max_tokens: Option<u64>,
    /// `escalate_at_percent` (1 to 100): at this share of a limit, requests escalate
    /// `budget_threshold_reached`.
    pub escalate_at_percent: Option<u8>,
    /// `max_spend`: amount per currency per window (empty: no spend limit).
    pub max_spend: Money,
}

/// `policy.rate_limits[]`: a token bucket taken by requests about to be forwarded (429
/// `rate_limited` when empty).
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// `scope`: `agent` (the default), `connector` or `action`.
    pub scope: Scope,
    /// Requests per `per`.
    pub count: u32,
    /// The period of `count`, from the unit of `rate`: 1 s, 1 min or 1 h.
    pub per: Duration,
    /// `burst`: the bucket size (default `count`, at least 1).
    pub burst: u32,
    /// `rate` as written (e.g. `10/s`): shown in refusal messages and part of a limit's Redis key.
    pub raw: String,
}

/// `policy`: the lists, caps, approval triggers, budgets and rate limits a manifest's requests are
/// decided by.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `policy.connectors`: connectors the agent may use (`tool_not_allowed` otherwise).
    pub connectors: AllowDeny,
    /// `policy.action_types`: action types the agent may perform (`action_type_not_allowed`
    /// otherwise).
    pub action_types: AllowDeny,
    /// `policy.amount_caps`: per currency, the largest amount allowed (`amount_exceeds_cap` above
    /// it).
    pub amount_caps: Money,
    /// `policy.approval`: what escalates to a human.
    pub approval: Approval,
    /// `policy.jurisdictions`: values of the `jurisdiction` param allowed
    /// (`jurisdiction_not_allowed` otherwise).
    pub jurisdictions: AllowDeny,
    /// `policy.counterparties`: values of the `counterparty` param allowed and denied
    /// (`counterparty_denied`, `counterparty_not_in_allowlist`).
    pub counterparties: AllowDeny,
    /// `policy.budgets`: per-window limits on actions, spend and LLM tokens.
    pub budgets: Vec<Budget>,
    /// `policy.rate_limits`: request rates, all checked before any is taken.
    pub rate_limits: Vec<RateLimit>,
    /// Constraints on declared params, by param name.
    pub params: BTreeMap<String, ParamConstraint>,
}

impl Policy {
    /// Currencies named by any currency-keyed rule (caps, approval thresholds, spend budgets).
    /// While one exists, an amount without a known currency fails closed.
    pub(crate) fn money_currencies(&self) -> impl Iterator<Item = &str> {
        self.amount_caps
            .keys()
            .chain(self.approval.amount_above.keys())
            .chain(self.budgets.iter().flat_map(|b| b.max_spend.keys()))
            .map(String::as_str)
    }
}

/// `escalation.mode`: what the agent gets while a human decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscalationMode {
    /// 403 with an approval id.
    Reject,
    /// Keep the request open until decided.
    Hold,
}

/// `escalation`: how ESCALATE decisions wait for a human.
#[derive(Debug, Clone)]
pub struct Escalation {
    /// `escalation.mode`: `reject` (the default) or `hold`.
    pub mode: EscalationMode,
    /// `escalation.hold_timeout`: with `hold`, how long a request waits for a decision before 403
    /// `approval_timeout` (default 120 s).
    pub hold_timeout: Duration,
    /// `escalation.approval_ttl`: a pending approval expires this long after it is created (default
    /// 24 h).
    pub approval_ttl: Duration,
    /// `escalation.override_ttl`: validity of the one-time override token handed out on approval
    /// (default 5 min).
    pub override_ttl: Duration,
    /// Pending approvals one agent may have at once; beyond → `too_many_pending_approvals`.
    pub max_pending: usize,
}

/// The manifest's `audit.bodies`: what is recorded of request bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodiesMode {
    /// Nothing of a body, not even its hash.
    None,
    /// Its SHA-256 and length (the default).
    Hash,
    /// The body's text for routes marked `safe`; bodies of other routes are hashed.
    Full,
}

/// The manifest's `audit`: what is recorded of each request's body and headers.
#[derive(Debug, Clone)]
pub struct ManifestAudit {
    /// `audit.bodies`: `none`, `hash` (the default) or `full`.
    pub bodies: BodiesMode,
    /// Lower-case header names recorded only as SHA-256.
    pub redact_headers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_patterns() {
        let p = PathPattern::parse("/v1/charges/**").unwrap();
        assert!(p.matches("/v1/charges").is_some());
        assert!(p.matches("/v1/charges/ch_1/refunds").is_some());
        assert!(p.matches("/v1/chargesX").is_none());
        let p = PathPattern::parse("/v1/*/x").unwrap();
        assert!(p.matches("/v1/a/x").is_some());
        assert!(p.matches("/v1//x").is_none());
        assert!(p.matches("/v1/a/b/x").is_none());
        assert!(PathPattern::parse("v1").is_err());
        assert!(PathPattern::parse("/**/x").is_err());
    }

    #[test]
    fn host_patterns_and_cidrs() {
        let c = Connector {
            name: "x".into(),
            base_url: None,
            hosts: vec!["api.example.com".into(), "*.svc.example.com".into()],
            ports: vec![443],
            tls: TlsMode::Intercept,
            credentials: Ok(vec![]),
            strip_headers: vec![],
            mcp: None,
            usage: None,
            usage_estimate: 4096,
            routes: vec![],
        };
        assert!(c.matches_host("API.example.com"));
        assert!(c.matches_host("a.svc.example.com"));
        assert!(c.matches_host("a.b.svc.example.com"));
        assert!(!c.matches_host("svc.example.com"));
        assert!(!c.matches_host("evilsvc.example.com"));
        assert!(!c.matches_host("api.example.com.evil.com"));
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("::1/128").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
    }
}
