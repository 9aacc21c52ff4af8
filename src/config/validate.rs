//! Raw → model conversion. Every check reports through `Cx` with a key path, so one run of
//! `check` lists every problem of a file at once.

use super::locate::locate;
use super::model::*;
use super::raw::*;
use super::{Diagnostic, Diagnostics, Strictness};
use http::{HeaderName, HeaderValue, Method};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub(super) struct Cx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
    /// Files the validated value depends on besides its own (issuer keys, credential files),
    /// read or not: the reload watcher follows them.
    pub reads: Vec<PathBuf>,
}

impl<'a> Cx<'a> {
    pub(super) fn new(file: &'a Path, text: &'a str) -> Self {
        Cx { file, text, errors: Vec::new(), warnings: Vec::new(), reads: Vec::new() }
    }
    fn diag(&self, key: &str, message: String) -> Diagnostic {
        let (line, col) = locate(self.text, key);
        Diagnostic { file: self.file.to_path_buf(), line, col, key: key.to_string(), message }
    }
    fn err(&mut self, key: &str, message: impl Into<String>) {
        let d = self.diag(key, message.into());
        self.errors.push(d);
    }
    fn warn(&mut self, key: &str, message: impl Into<String>) {
        let d = self.diag(key, message.into());
        self.warnings.push(d);
    }
    pub(super) fn finish<T>(self, value: T) -> Result<T, Diagnostics> {
        if self.errors.is_empty() { Ok(value) } else { Err(Diagnostics(self.errors)) }
    }
}

/// `500ms`, `10s`, `5m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?} (expected e.g. 10s, 5m, 24h)"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("invalid duration {s:?} (units: ms, s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// `20/s`, `100/m`, `1000/h` → (count, period).
pub(crate) fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("invalid rate {s:?} (expected n/s, n/m or n/h with n > 0)");
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok((n, per))
}

/// A non-negative decimal string such as "100.00".
fn parse_money(s: &str) -> Result<Decimal, String> {
    let d = Decimal::from_str_exact(s.trim())
        .map_err(|_| format!("invalid amount {s:?} (expected a decimal string like \"100.00\")"))?;
    if d.is_sign_negative() {
        return Err(format!("amount {s:?} is negative"));
    }
    Ok(d)
}

pub(crate) fn is_currency(c: &str) -> bool {
    c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic())
}

fn money(cx: &mut Cx, key: &str, raw: BTreeMap<String, String>) -> Money {
    let mut out = Money::new();
    for (cur, amount) in raw {
        let k = format!("{key}.{cur}");
        if !is_currency(&cur) {
            cx.err(&k, format!("{cur:?} is not a 3-letter ISO-4217 currency code"));
            continue;
        }
        match parse_money(&amount) {
            Ok(d) => {
                out.insert(cur.to_ascii_uppercase(), d);
            }
            Err(e) => cx.err(&k, e),
        }
    }
    out
}

fn duration(cx: &mut Cx, key: &str, raw: Option<String>, default: Duration) -> Duration {
    match raw {
        None => default,
        Some(s) => parse_duration(&s).unwrap_or_else(|e| {
            cx.err(key, e);
            default
        }),
    }
}

/// `capability.leeway` when the manifest says nothing.
pub(super) const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// More skew than this is not clock skew: a token an hour past `exp` is expired.
const MAX_LEEWAY: Duration = Duration::from_secs(3600);

pub(super) fn is_agent_id(id: &str) -> bool {
    let b = id.as_bytes();
    (3..=63).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..].iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

// ---------------------------------------------------------------- gateway.yaml

fn addr(cx: &mut Cx, key: &str, raw: Option<String>, default: &str) -> SocketAddr {
    let s = raw.unwrap_or_else(|| default.to_string());
    s.parse().unwrap_or_else(|_| {
        cx.err(key, format!("{s:?} is not an address like 127.0.0.1:15080"));
        default.parse().expect("valid default address")
    })
}

pub(super) fn gateway(cx: &mut Cx, raw: RawGateway) -> GatewayConfig {
    let data_dir = PathBuf::from(raw.data_dir.unwrap_or_else(|| "./data".into()));
    let under_data = |o: Option<String>, name: &str| o.map(PathBuf::from).unwrap_or_else(|| data_dir.join(name));
    let transparent = raw.listeners.transparent.map(|s| addr(cx, "listeners.transparent", Some(s), "0.0.0.0:15001"));
    let durability = match raw.audit.durability.as_deref() {
        None | Some("sync") => AuditDurability::Sync,
        Some("async") => AuditDurability::Async,
        Some(o) => {
            cx.err("audit.durability", format!("{o:?} is not one of sync, async"));
            AuditDurability::Sync
        }
    };
    let explicit_origin = raw.audit.origin.is_some();
    let audit_path_set = raw.audit.path.is_some();
    let origin = raw.audit.origin.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("uapk-gateway/{host}")
    });
    if let Err(e) = crate::audit::valid_key_name(&origin) {
        cx.err("audit.origin", format!("{origin:?} {e}; it is the checkpoints' key name"));
    }
    let queue_capacity = raw.audit.queue_capacity.unwrap_or(65_536);
    if queue_capacity == 0 {
        cx.err("audit.queue_capacity", "must be at least 1");
    }
    let mut admin_keys = Vec::new();
    let mut key_ids = HashSet::new();
    for (i, k) in raw.admin.keys.into_iter().enumerate() {
        let key = format!("admin.keys[{i}]");
        // The id is what approval entries name (`by`): it must say which key acted.
        if k.id.trim().is_empty() {
            cx.err(&format!("{key}.id"), "must not be empty: approval entries name the key that made them");
        } else if k.id == BY_GATEWAY {
            cx.err(
                &format!("{key}.id"),
                format!("{:?} is reserved: it names the gateway's own approval events (`by`)", k.id),
            );
        } else if !key_ids.insert(k.id.clone()) {
            cx.err(
                &format!("{key}.id"),
                format!("admin key id {:?} is used twice: approval entries could not say which key acted", k.id),
            );
        }
        let role = match k.role.as_str() {
            "viewer" => AdminRole::Viewer,
            "auditor" => AdminRole::Auditor,
            "approver" => AdminRole::Approver,
            "admin" => AdminRole::Admin,
            o => {
                cx.err(&format!("{key}.role"), format!("{o:?} is not one of viewer, auditor, approver, admin"));
                continue;
            }
        };
        let mut sha = [0u8; 32];
        if hex::decode_to_slice(k.sha256.trim(), &mut sha).is_err() {
            cx.err(&format!("{key}.sha256"), "must be 64 hex characters (from `uapk-gateway admin-key new`)");
            continue;
        }
        admin_keys.push(AdminKey { id: k.id, sha256: sha, role });
    }
    let mut private = Vec::new();
    for (i, c) in raw.network.allow_private_destinations.iter().enumerate() {
        match Cidr::parse(c) {
            Some(c) => private.push(c),
            None => cx.err(&format!("network.allow_private_destinations[{i}]"), format!("{c:?} is not a CIDR")),
        }
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(o) => {
            cx.err("log_format", format!("{o:?} is not one of json, text"));
            LogFormat::Json
        }
    };
    if let Some(a) = &raw.identity.default_agent
        && !is_agent_id(a)
    {
        cx.err("identity.default_agent", format!("{a:?} is not a valid agent id (^[a-z0-9][a-z0-9-]{{2,62}}$)"));
    }
    let l = raw.limits;
    let limits = Limits {
        max_header_bytes: l.max_header_bytes.unwrap_or(65_536),
        max_body_bytes: l.max_body_bytes.unwrap_or(10_485_760),
        // The default never exceeds a smaller max_body_bytes (a config that lowered it stays valid).
        hash_before_forward: l.hash_before_forward.unwrap_or(65_536.min(l.max_body_bytes.unwrap_or(10_485_760))),
        header_read_timeout: duration(cx, "limits.header_read_timeout", l.header_read_timeout, Duration::from_secs(10)),
        body_read_timeout: duration(cx, "limits.body_read_timeout", l.body_read_timeout, Duration::from_secs(30)),
        upstream_connect_timeout: duration(
            cx,
            "limits.upstream_connect_timeout",
            l.upstream_connect_timeout,
            Duration::from_secs(5),
        ),
        upstream_timeout: duration(cx, "limits.upstream_timeout", l.upstream_timeout, Duration::from_secs(60)),
        max_connections: l.max_connections.unwrap_or(4096),
        max_in_flight_per_agent: l.max_in_flight_per_agent,
        idle_timeout: duration(cx, "limits.idle_timeout", l.idle_timeout, Duration::from_secs(60)),
        tls_handshake_timeout: duration(
            cx,
            "limits.tls_handshake_timeout",
            l.tls_handshake_timeout,
            Duration::from_secs(10),
        ),
        tunnel_idle_timeout: duration(
            cx,
            "limits.tunnel_idle_timeout",
            l.tunnel_idle_timeout,
            Duration::from_secs(300),
        ),
        refusals_per_second: match l.refusals_per_agent.as_deref().map(parse_rate) {
            None => 50.0,
            Some(Ok((n, per))) => f64::from(n) / per.as_secs_f64(),
            Some(Err(e)) => {
                cx.err("limits.refusals_per_agent", e);
                50.0
            }
        },
        refusals_burst: l.refusals_burst.unwrap_or(100),
        usage_drain_timeout: duration(cx, "limits.usage_drain_timeout", l.usage_drain_timeout, Duration::from_secs(10)),
    };
    if limits.max_header_bytes < 1024 {
        cx.err("limits.max_header_bytes", "must be at least 1024");
    }
    if limits.hash_before_forward > limits.max_body_bytes {
        // A body read before forwarding is bounded by max_body_bytes like any buffered body.
        cx.err("limits.hash_before_forward", "must not exceed limits.max_body_bytes");
    }
    if limits.max_connections == 0 {
        cx.err("limits.max_connections", "must be at least 1");
    }
    if limits.max_in_flight_per_agent == Some(0) {
        cx.err("limits.max_in_flight_per_agent", "must be at least 1");
    }
    if limits.refusals_burst == 0 {
        cx.err("limits.refusals_burst", "must be at least 1");
    }
    for (key, d) in [
        ("limits.header_read_timeout", limits.header_read_timeout),
        ("limits.idle_timeout", limits.idle_timeout),
        ("limits.tls_handshake_timeout", limits.tls_handshake_timeout),
        ("limits.tunnel_idle_timeout", limits.tunnel_idle_timeout),
    ] {
        if d.is_zero() {
            cx.err(key, "must be greater than zero (a connection must not wait forever or not at all)");
        }
    }
    let otlp = otlp(cx, raw.telemetry.otlp);
    let rate_limits = rate_limits(cx, raw.rate_limits);
    let state = state(cx, raw.state);
    if let StateBackend::Postgres(_) = &state {
        if !explicit_origin {
            cx.err(
                "audit.origin",
                "is required with state.backend: postgres (every gateway of the fleet appends to the log of this origin; host names differ between pods)",
            );
        }
        if audit_path_set {
            cx.warn("audit.path", "is not used with state.backend: postgres (the log is in the database)");
        }
        if let RateLimitBackend::Local = &rate_limits {
            cx.warn(
                "rate_limits.backend",
                "is local with state.backend: postgres: each gateway of the fleet enforces each rate limit on its own (use redis for one limit per fleet)",
            );
        }
    }
    let admin_max_connections = raw.admin.max_connections.unwrap_or(256);
    if admin_max_connections == 0 {
        cx.err("admin.max_connections", "must be at least 1");
    }
    GatewayConfig {
        proxy_listener: addr(cx, "listeners.proxy", raw.listeners.proxy, "127.0.0.1:15080"),
        transparent_listener: transparent,
        admin_listener: addr(cx, "listeners.admin", raw.listeners.admin, "127.0.0.1:15021"),
        policies_dir: PathBuf::from(raw.policies.unwrap_or_else(|| "./policies".into())),
        gateway_key: under_data(raw.keys.gateway, "gateway.pem"),
        tls: TlsSettings {
            ca_cert: under_data(raw.tls.ca_cert, "ca.pem"),
            ca_key: under_data(raw.tls.ca_key, "ca-key.pem"),
            extra_upstream_roots: raw.tls.extra_upstream_roots.into_iter().map(PathBuf::from).collect(),
            leaf_ttl: duration(cx, "tls.leaf_ttl", raw.tls.leaf_ttl, Duration::from_secs(86_400)),
        },
        audit: AuditSettings {
            path: under_data(raw.audit.path, "audit.redb"),
            origin,
            durability,
            sign_each_entry: raw.audit.sign_each_entry.unwrap_or(false),
            queue_capacity,
        },
        state,
        identity: IdentitySettings {
            default_agent: raw.identity.default_agent,
            token_file: raw.identity.token_file.map(PathBuf::from),
        },
        admin_keys,
        admin_max_connections,
        limits,
        allow_private_destinations: private,
        log_format,
        data_dir,
        otlp,
        rate_limits,
    }
}

/// `rate_limits` (SPEC §15.1): `local` (default) or `redis` with exactly one of `url_file` and
/// `url`. The URL's password is never shown: diagnostics name the key, not the value.
fn rate_limits(cx: &mut Cx, raw: RawRateLimits) -> RateLimitBackend {
    let redis = raw.redis;
    match raw.backend.as_deref().map(str::trim) {
        None | Some("local") => {
            if redis.is_some_and(|r| r.url.is_some() || r.url_file.is_some()) {
                cx.warn("rate_limits.redis", "has no effect with rate_limits.backend: local");
            }
            RateLimitBackend::Local
        }
        Some("redis") => {
            let Some(r) = redis else {
                cx.err("rate_limits.redis", "rate_limits.backend: redis needs rate_limits.redis.url_file or .url");
                return RateLimitBackend::Local;
            };
            let timeout = duration(cx, "rate_limits.redis.timeout", r.timeout, Duration::from_millis(100));
            if timeout.is_zero() {
                cx.err("rate_limits.redis.timeout", "must be greater than zero");
            }
            let (key, url) = match (r.url_file, r.url) {
                (Some(_), Some(_)) => {
                    cx.err("rate_limits.redis.url", "set either url_file or url, not both");
                    return RateLimitBackend::Local;
                }
                (None, None) => {
                    cx.err("rate_limits.redis", "rate_limits.backend: redis needs rate_limits.redis.url_file or .url");
                    return RateLimitBackend::Local;
                }
                (Some(file), None) => match std::fs::read_to_string(&file) {
                    Ok(text) => ("rate_limits.redis.url_file", SecretUrl::new(text.trim().to_string())),
                    Err(e) => {
                        cx.err("rate_limits.redis.url_file", format!("cannot read {file}: {e}"));
                        return RateLimitBackend::Local;
                    }
                },
                (None, Some(url)) => ("rate_limits.redis.url", SecretUrl::new(url.trim().to_string())),
            };
            match url::Url::parse(url.expose()) {
                Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.host_str().is_some() => {}
                _ => {
                    cx.err(key, "is not a redis:// or rediss:// URL with a host");
                    return RateLimitBackend::Local;
                }
            }
            if key == "rate_limits.redis.url" && url.has_password() {
                cx.warn(
                    key,
                    format!(
                        "{} carries a password in gateway.yaml; prefer url_file (a mounted Secret)",
                        url.redacted()
                    ),
                );
            }
            let ca_file = r.ca_file.map(PathBuf::from);
            if ca_file.is_some() && !url.expose().starts_with("rediss://") {
                cx.warn("rate_limits.redis.ca_file", "has no effect without a rediss:// URL");
            }
            RateLimitBackend::Redis(RedisSettings { url, timeout, ca_file })
        }
        Some(o) => {
            cx.err("rate_limits.backend", format!("{o:?} is not one of local, redis"));
            RateLimitBackend::Local
        }
    }
}

/// `state` (SPEC §15.1): the backend and, for postgres, its connection.
fn state(cx: &mut Cx, raw: RawState) -> StateBackend {
    match raw.backend.as_deref() {
        None | Some("embedded") => return StateBackend::Embedded,
        Some("postgres") => {}
        Some(o) => {
            cx.err("state.backend", format!("{o:?} is not one of embedded, postgres"));
            return StateBackend::Embedded;
        }
    }
    let p = raw.postgres;
    let url = match (p.url_file, p.url) {
        (Some(_), Some(_)) => {
            cx.err("state.postgres.url", "set either url or url_file, not both");
            SecretSource::Inline(String::new())
        }
        (Some(f), None) => SecretSource::File(PathBuf::from(f)),
        (None, Some(u)) => {
            match url::Url::parse(&u) {
                Ok(parsed) if matches!(parsed.scheme(), "postgres" | "postgresql") => {
                    if parsed.password().is_some() {
                        cx.warn(
                            "state.postgres.url",
                            "carries a password inline: keep it in a file (a mounted Secret) and use url_file",
                        );
                    }
                }
                _ => cx.err("state.postgres.url", format!("{} is not a postgres:// URL", redact_url(&u))),
            }
            SecretSource::Inline(u)
        }
        (None, None) => {
            cx.err("state.postgres", "url_file (or url) is required with state.backend: postgres");
            SecretSource::Inline(String::new())
        }
    };
    let pool_size = p.pool_size.unwrap_or(8);
    if pool_size < 2 {
        cx.err("state.postgres.pool_size", "must be at least 2 (the log's writer keeps one connection)");
    }
    let connect_timeout = duration(cx, "state.postgres.connect_timeout", p.connect_timeout, Duration::from_secs(2));
    let statement_timeout =
        duration(cx, "state.postgres.statement_timeout", p.statement_timeout, Duration::from_millis(500));
    for (key, d) in
        [("state.postgres.connect_timeout", connect_timeout), ("state.postgres.statement_timeout", statement_timeout)]
    {
        if d.is_zero() {
            cx.err(key, "must be greater than zero (a database that does not answer must fail closed, not hang)");
        }
    }
    StateBackend::Postgres(PostgresSettings {
        url,
        pool_size,
        connect_timeout,
        statement_timeout,
        ca_file: p.ca_file.map(PathBuf::from),
    })
}

/// `telemetry.otlp`: off without an endpoint; the endpoint must be an `http://` or `https://`
/// URL (for gRPC, with no path: the service path is fixed by the protocol).
fn otlp(cx: &mut Cx, raw: RawOtlp) -> Option<OtlpSettings> {
    let protocol = match raw.protocol.as_deref() {
        None | Some("http") | Some("http/protobuf") => OtlpProtocol::Http,
        Some("grpc") => OtlpProtocol::Grpc,
        Some(o) => {
            cx.err("telemetry.otlp.protocol", format!("{o:?} is not one of http, grpc"));
            OtlpProtocol::Http
        }
    };
    let timeout = duration(cx, "telemetry.otlp.timeout", raw.timeout, Duration::from_secs(2));
    if timeout.is_zero() {
        cx.err("telemetry.otlp.timeout", "must be greater than zero");
    }
    let queue_size = raw.queue_size.unwrap_or(2048);
    if queue_size == 0 {
        cx.err("telemetry.otlp.queue_size", "must be at least 1");
    }
    let raw_endpoint = raw.endpoint.filter(|e| !e.trim().is_empty())?;
    let key = "telemetry.otlp.endpoint";
    let url = match url::Url::parse(raw_endpoint.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
        _ => {
            cx.err(key, format!("{raw_endpoint:?} is not an http:// or https:// URL of a collector"));
            return None;
        }
    };
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
        cx.err(key, "must carry no credentials, query or fragment");
        return None;
    }
    let endpoint = match protocol {
        OtlpProtocol::Http if url.path() == "/" => format!("{}v1/traces", url.as_str()),
        OtlpProtocol::Http => url.to_string(),
        OtlpProtocol::Grpc if url.path() == "/" => url.as_str().trim_end_matches('/').to_string(),
        OtlpProtocol::Grpc => {
            cx.err(key, "with protocol grpc, give the collector's origin only (e.g. http://collector:4317)");
            return None;
        }
    };
    Some(OtlpSettings { endpoint, protocol, timeout, queue_size })
}

// ---------------------------------------------------------------- manifest

fn allow_deny(raw: RawAllowDeny) -> AllowDeny {
    let trim = |v: Vec<String>| v.into_iter().map(|s| s.trim().to_string()).collect();
    AllowDeny { allow: trim(raw.allow), deny: trim(raw.deny) }
}

fn resolve_path(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// Expands `${file:PATH}` and `${env:NAME}` in a credential template. The error names the
/// source, never a secret.
/// Why a credential template did not resolve: a source that is missing now (a file not there
/// yet, an unset variable: the connector is unavailable until it appears) or a template that can
/// never work (a configuration error).
enum SecretError {
    Missing(String),
    Invalid(String),
}

fn resolve_secret(template: &str, base: &Path, reads: &mut Vec<PathBuf>) -> Result<String, SecretError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end =
            after.find('}').ok_or_else(|| SecretError::Invalid("unterminated ${...} in credential value".into()))?;
        let spec = &after[..end];
        let value = if let Some(f) = spec.strip_prefix("file:") {
            let path = resolve_path(base, f);
            reads.push(path.clone());
            let v = std::fs::read_to_string(&path)
                .map_err(|e| SecretError::Missing(format!("credential file {} cannot be read: {e}", path.display())))?;
            v.trim_end_matches(['\n', '\r']).to_string()
        } else if let Some(name) = spec.strip_prefix("env:") {
            std::env::var(name)
                .map_err(|_| SecretError::Missing(format!("credential environment variable {name} is not set")))?
        } else {
            return Err(SecretError::Invalid(format!(
                "unknown credential source ${{{spec}}} (use ${{file:...}} or ${{env:...}})"
            )));
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn connector(cx: &mut Cx, key: &str, raw: RawConnector, base: &Path, _strict: Strictness) -> Connector {
    if !is_agent_id(&raw.name) {
        cx.err(
            &format!("{key}.name"),
            format!("{:?} is not a valid connector name (^[a-z0-9][a-z0-9-]{{2,62}}$)", raw.name),
        );
    }
    if raw.name == "uapk" {
        cx.err(&format!("{key}.name"), "\"uapk\" is reserved: /uapk/v1/... is the gateway's own API for agents");
    }
    let base_url = raw.base_url.as_ref().and_then(|u| {
        let k = format!("{key}.base_url");
        let parsed = match url::Url::parse(u) {
            Ok(p) => p,
            Err(e) => {
                cx.err(&k, format!("{u:?} is not a URL: {e}"));
                return None;
            }
        };
        let scheme = match parsed.scheme() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            s => {
                cx.err(&k, format!("scheme {s:?} is not http or https"));
                return None;
            }
        };
        if parsed.query().is_some()
            || parsed.fragment().is_some()
            || !parsed.username().is_empty()
            || parsed.password().is_some()
        {
            cx.err(&k, "must not carry a query, fragment or user info");
            return None;
        }
        let host = parsed.host_str()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let host = host.strip_suffix('.').map(str::to_string).unwrap_or(host);
        Some(BaseUrl {
            scheme,
            port: parsed.port_or_known_default().unwrap_or(443),
            host,
            path_prefix: parsed.path().trim_end_matches('/').to_string(),
        })
    });
    // Hosts compare lower-case without a trailing dot (`API.example.com.` is `api.example.com`).
    let mut hosts: Vec<String> = raw
        .hosts
        .iter()
        .map(|h| {
            let h = h.trim().to_ascii_lowercase();
            h.strip_suffix('.').map(str::to_string).unwrap_or(h)
        })
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let bare = h.strip_prefix("*.").unwrap_or(h);
        let ok = !bare.is_empty()
            && !bare.contains('*')
            && bare.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !ok {
            cx.err(&format!("{key}.hosts[{i}]"), format!("{h:?} is not a host name or *.suffix pattern"));
        }
    }
    if hosts.is_empty() {
        match &base_url {
            Some(b) => hosts.push(b.host.clone()),
            None => cx.err(&format!("{key}.hosts"), "a connector needs `hosts` or a `base_url`"),
        }
    }
    let mut ports = raw.ports.clone();
    if ports.is_empty() {
        ports.push(base_url.as_ref().map_or(443, |b| b.port));
    }
    if ports.contains(&0) {
        cx.err(&format!("{key}.ports"), "port 0 is not a port");
    }
    let tls = match raw.tls.as_deref() {
        None | Some("intercept") => TlsMode::Intercept,
        Some("passthrough") => TlsMode::Passthrough,
        Some(o) => {
            cx.err(&format!("{key}.tls"), format!("{o:?} is not one of intercept, passthrough"));
            TlsMode::Intercept
        }
    };
    let mut creds = Ok(Vec::new());
    for (i, c) in raw.credentials.iter().enumerate() {
        let k = format!("{key}.credentials[{i}]");
        let Ok(name) = HeaderName::from_str(&c.header) else {
            cx.err(&format!("{k}.header"), format!("{:?} is not a header name", c.header));
            continue;
        };
        match resolve_secret(&c.value, base, &mut cx.reads) {
            Ok(v) => match HeaderValue::from_str(&v) {
                Ok(mut hv) => {
                    hv.set_sensitive(true);
                    if let Ok(list) = creds.as_mut() {
                        list.push((name, hv));
                    }
                }
                Err(_) => cx.err(&format!("{k}.value"), "the resolved credential is not a valid header value"),
            },
            // `check` and `run` judge a missing source alike: a warning, and the connector denies
            // `connector_unavailable` (it never forwards unauthenticated).
            Err(SecretError::Missing(e)) => {
                cx.warn(&format!("{k}.value"), format!("{e}; connector {:?} is unavailable", raw.name));
                creds = Err(e);
            }
            Err(SecretError::Invalid(e)) => {
                cx.err(&format!("{k}.value"), e.clone());
                creds = Err(e);
            }
        }
    }
    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        routes.extend(route(cx, &format!("{key}.routes[{i}]"), r));
    }
    let mcp =
        mcp_endpoint(cx, key, raw.protocol.as_deref(), raw.mcp_path, raw.tools, base_url.as_ref(), !routes.is_empty());
    // Overlap warning: a later route that an earlier one fully shadows.
    for i in 0..routes.len() {
        for j in 0..i {
            let (a, b) = (&routes[j], &routes[i]);
            let methods_cover =
                a.methods.is_empty() || b.methods.iter().all(|m| a.methods.contains(m)) && !b.methods.is_empty();
            if methods_cover && a.path.raw == b.path.raw {
                cx.warn(
                    &format!("{key}.routes[{i}]"),
                    format!("never matches: routes[{j}] has the same path and covers its methods"),
                );
            }
        }
    }
    let mut strip_headers = Vec::new();
    for (i, h) in raw.strip_headers.iter().enumerate() {
        match HeaderName::from_str(h) {
            Ok(n) => strip_headers.push(n),
            Err(_) => cx.err(&format!("{key}.strip_headers[{i}]"), format!("{h:?} is not a header name")),
        }
    }
    let usage = match raw.usage.as_deref() {
        None => None,
        Some("openai") => Some(UsageFormat::OpenAi),
        Some("anthropic") => Some(UsageFormat::Anthropic),
        Some(o) => {
            cx.err(&format!("{key}.usage"), format!("{o:?} is not one of openai, anthropic"));
            None
        }
    };
    // An estimate of 0 would count nothing for a call whose usage cannot be read; 2^53 is the
    // largest token count the usage reader accepts.
    let usage_estimate = match raw.usage_estimate {
        None => DEFAULT_USAGE_ESTIMATE,
        Some(n) if n == 0 || n > 1 << 53 => {
            cx.err(&format!("{key}.usage_estimate"), format!("{n} is not a token count between 1 and 2^53"));
            DEFAULT_USAGE_ESTIMATE
        }
        Some(n) => {
            if usage.is_none() {
                cx.warn(&format!("{key}.usage_estimate"), "has no effect without `usage: openai | anthropic`");
            }
            n
        }
    };
    Connector {
        name: raw.name,
        base_url,
        hosts,
        ports,
        tls,
        credentials: creds,
        strip_headers,
        usage,
        usage_estimate,
        routes,
        mcp,
    }
}

/// One route (or an MCP tool, given as a route on the endpoint's path) from its raw form; `None`
/// when it cannot be used (the error is reported).
fn route(cx: &mut Cx, k: &str, r: RawRoute) -> Option<Route> {
    let mut methods = Vec::new();
    for (j, m) in r.methods.iter().enumerate() {
        match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(m) => methods.push(m),
            Err(_) => cx.err(&format!("{k}.methods[{j}]"), format!("{m:?} is not an HTTP method")),
        }
    }
    let path = match PathPattern::parse(&r.path) {
        Ok(p) => p,
        Err(e) => {
            cx.err(&format!("{k}.path"), format!("{:?}: {e}", r.path));
            return None;
        }
    };
    if r.action.is_empty() || r.action.contains(char::is_whitespace) {
        cx.err(&format!("{k}.action"), "must be a non-empty action type like payment.refund");
    }
    let mut params = Vec::new();
    for (name, p) in r.params {
        let pk = format!("{k}.params.{name}");
        let sources = [
            p.json.is_some(),
            p.form.is_some(),
            p.header.is_some(),
            p.query.is_some(),
            p.path.is_some(),
            p.value.is_some(),
        ];
        if sources.iter().filter(|&&s| s).count() != 1 {
            cx.err(&pk, "needs exactly one of json, form, header, query, path, value");
            continue;
        }
        let source = if let Some(ptr) = p.json {
            if !(ptr.is_empty() || ptr.starts_with('/')) {
                cx.err(&format!("{pk}.json"), format!("{ptr:?} is not a JSON pointer (e.g. /amount)"));
            }
            ParamSource::Json(ptr)
        } else if let Some(key) = p.form {
            if key.is_empty() {
                cx.err(&format!("{pk}.form"), "must name a form key (e.g. amount or metadata[order_id])");
            }
            ParamSource::Form(key)
        } else if let Some(v) = p.value {
            if v.trim().is_empty() {
                cx.err(&format!("{pk}.value"), "a fixed value must not be empty");
            }
            ParamSource::Value(v)
        } else if let Some(h) = p.header {
            match HeaderName::from_str(&h) {
                Ok(h) => ParamSource::Header(h),
                Err(_) => {
                    cx.err(&format!("{pk}.header"), format!("{h:?} is not a header name"));
                    continue;
                }
            }
        } else if let Some(q) = p.query {
            if q.is_empty() {
                cx.err(&format!("{pk}.query"), "must name a query parameter");
            }
            ParamSource::Query(q)
        } else {
            let name = p.path.unwrap_or_default();
            if !path.captures().any(|c| c == name) {
                cx.err(&format!("{pk}.path"), format!("the route path {:?} captures no {{{name}}}", r.path));
            }
            ParamSource::Path(name)
        };
        if let Some(s) = p.scale
            && s > 18
        {
            cx.err(&format!("{pk}.scale"), "must be at most 18");
        }
        params.push(ParamSpec { name, source, scale: p.scale });
    }
    let json = params.iter().any(|p| matches!(p.source, ParamSource::Json(_)));
    let form = params.iter().any(|p| matches!(p.source, ParamSource::Form(_)));
    if json && form {
        cx.err(&format!("{k}.params"), "a route reads its body either as JSON (json:) or as a form (form:), not both");
    }
    Some(Route { methods, path, action: r.action, params, safe: r.safe })
}

/// `protocol: mcp`: the endpoint path and the tool rules. A tool's `json` params point into its
/// call's `params.arguments`; it reads nothing else of the request but fixed values and headers.
fn mcp_endpoint(
    cx: &mut Cx,
    key: &str,
    protocol: Option<&str>,
    mcp_path: Option<String>,
    tools: Vec<RawTool>,
    base_url: Option<&BaseUrl>,
    has_routes: bool,
) -> Option<McpEndpoint> {
    match protocol {
        None | Some("http") => {
            if mcp_path.is_some() || !tools.is_empty() {
                cx.err(&format!("{key}.protocol"), "mcp_path and tools need protocol: mcp");
            }
            return None;
        }
        Some("mcp") => {}
        Some(o) => {
            cx.err(&format!("{key}.protocol"), format!("{o:?} is not one of http, mcp"));
            return None;
        }
    }
    if has_routes {
        cx.err(&format!("{key}.routes"), "an MCP connector is governed by its tools, not routes");
    }
    let mcp_path = mcp_path.unwrap_or_else(|| "/mcp".to_string());
    if !mcp_path.starts_with('/') || mcp_path.contains(['?', '#', '*', '{', ';']) {
        cx.err(&format!("{key}.mcp_path"), format!("{mcp_path:?} is not a plain path like /mcp"));
    }
    let path = format!("{}{}", base_url.map_or("", |b| b.path_prefix.as_str()), mcp_path);
    let mut out = Vec::new();
    for (i, t) in tools.into_iter().enumerate() {
        let k = format!("{key}.tools[{i}]");
        if t.name.trim().is_empty() {
            cx.err(&format!("{k}.name"), "must be a tool name or *");
        }
        let mut params = BTreeMap::new();
        for (name, mut p) in t.params {
            if p.form.is_some() || p.query.is_some() || p.path.is_some() {
                cx.err(
                    &format!("{k}.params.{name}"),
                    "a tool reads its call's arguments (json: /pointer), a header or a fixed value (value:)",
                );
                continue;
            }
            if let Some(ptr) = &p.json
                && !(ptr.is_empty() || ptr.starts_with('/'))
            {
                cx.err(&format!("{k}.params.{name}.json"), format!("{ptr:?} is not a JSON pointer (e.g. /amount)"));
                continue;
            }
            p.json = p.json.map(|ptr| format!("/params/arguments{ptr}"));
            params.insert(name, p);
        }
        let raw =
            RawRoute { methods: vec!["POST".into()], path: mcp_path.clone(), action: t.action, params, safe: false };
        if let Some(rule) = route(cx, &k, raw) {
            out.push(McpTool { name: (t.name != "*").then_some(t.name), rule });
        }
    }
    Some(McpEndpoint { path, tools: out })
}

pub(super) fn manifest(cx: &mut Cx, raw: RawManifest, base: &Path, strict: Strictness, sha256: String) -> Manifest {
    if raw.api_version != "uapk/v1" {
        cx.err("apiVersion", format!("{:?} is not supported (expected uapk/v1)", raw.api_version));
    }
    if raw.kind != "Manifest" {
        cx.err("kind", format!("{:?} is not supported (expected Manifest)", raw.kind));
    }
    if !is_agent_id(&raw.agent.id) {
        cx.err("agent.id", format!("{:?} is not a valid agent id (^[a-z0-9][a-z0-9-]{{2,62}}$)", raw.agent.id));
    }
    let mode = match raw.mode.as_deref() {
        None | Some("enforce") => PolicyMode::Enforce,
        Some("dry_run") => PolicyMode::DryRun,
        Some(o) => {
            cx.err("mode", format!("{o:?} is not one of enforce, dry_run"));
            PolicyMode::Enforce
        }
    };
    let c = raw.capability;
    let mut issuers = Vec::new();
    let mut seen = HashSet::new();
    let listed = c.issuers.len();
    for (i, is) in c.issuers.into_iter().enumerate() {
        let k = format!("capability.issuers[{i}]");
        if !seen.insert(is.id.clone()) {
            cx.err(&format!("{k}.id"), format!("issuer {:?} is listed twice", is.id));
        }
        let pem = match (&is.public_key_file, &is.public_key) {
            (Some(f), None) => {
                let path = resolve_path(base, f);
                cx.reads.push(path.clone());
                match std::fs::read_to_string(&path) {
                    Ok(p) => p,
                    Err(e) => {
                        cx.err(
                            &format!("{k}.public_key_file"),
                            format!("issuer key file {} cannot be read: {e}", path.display()),
                        );
                        continue;
                    }
                }
            }
            (None, Some(p)) => p.clone(),
            _ => {
                cx.err(&k, "needs exactly one of public_key_file, public_key");
                continue;
            }
        };
        use ed25519_dalek::pkcs8::DecodePublicKey;
        match ed25519_dalek::VerifyingKey::from_public_key_pem(pem.trim()) {
            Ok(key) => issuers.push(Issuer { id: is.id, key }),
            Err(_) => cx.err(
                &format!("{k}.{}", if is.public_key.is_some() { "public_key" } else { "public_key_file" }),
                "is not an Ed25519 public key in SPKI PEM form (from `uapk-gateway keygen`)",
            ),
        }
    }
    let required = c.required.unwrap_or(true);
    if required && listed == 0 {
        cx.err("capability.issuers", "capability.required is true but no issuer is listed");
    }
    let capability = CapabilityPolicy {
        required,
        audience: c.audience.unwrap_or_else(|| "uapk-gateway".into()),
        max_lifetime: duration(cx, "capability.max_lifetime", c.max_lifetime, Duration::from_secs(86_400)),
        leeway: {
            let l = duration(cx, "capability.leeway", c.leeway, DEFAULT_LEEWAY);
            // Sub-second values would be rounded away by the seconds-based time claims.
            if l > MAX_LEEWAY || l.subsec_nanos() != 0 {
                cx.err("capability.leeway", "must be whole seconds from 0s to 1h");
            }
            l.min(MAX_LEEWAY)
        },
        issuers,
        revoked: c.revoked.into_iter().collect(),
    };

    let mut connectors: Vec<Arc<Connector>> = Vec::new();
    for (i, rc) in raw.connectors.into_iter().enumerate() {
        let k = format!("connectors[{i}]");
        if connectors.iter().any(|c| c.name == rc.name) {
            cx.err(&format!("{k}.name"), format!("connector {:?} is defined twice", rc.name));
        }
        connectors.push(Arc::new(connector(cx, &k, rc, base, strict)));
    }
    let defined: HashSet<&str> = connectors.iter().map(|c| c.name.as_str()).collect();
    let p = raw.policy;
    let check_refs = |cx: &mut Cx, key: &str, names: &[String]| {
        for (i, n) in names.iter().enumerate() {
            if !n.ends_with('*') && !defined.contains(n.as_str()) {
                cx.err(
                    &format!("{key}[{i}]"),
                    format!("connector {n:?} is referenced but not defined in `connectors`"),
                );
            }
        }
    };
    check_refs(cx, "policy.connectors.allow", &p.connectors.allow);
    check_refs(cx, "policy.connectors.deny", &p.connectors.deny);
    check_refs(cx, "policy.approval.connectors", &p.approval.connectors);

    let amount_caps = money(cx, "policy.amount_caps", p.amount_caps);
    let approval = Approval {
        action_types: p.approval.action_types,
        connectors: p.approval.connectors,
        amount_above: money(cx, "policy.approval.amount_above", p.approval.amount_above),
    };
    let scope = |cx: &mut Cx, key: &str, s: Option<String>| match s.as_deref() {
        None | Some("agent") => Scope::Agent,
        Some("connector") => Scope::Connector,
        Some("action") => Scope::Action,
        Some(o) => {
            cx.err(key, format!("{o:?} is not one of agent, connector, action"));
            Scope::Agent
        }
    };
    let mut budgets = Vec::new();
    for (i, b) in p.budgets.into_iter().enumerate() {
        let k = format!("policy.budgets[{i}]");
        let window = match b.window.as_str() {
            "day" => Window::Day,
            "hour" => Window::Hour,
            o => {
                cx.err(&format!("{k}.window"), format!("{o:?} is not one of day, hour"));
                Window::Day
            }
        };
        if let Some(pct) = b.escalate_at_percent
            && !(1..=100).contains(&pct)
        {
            cx.err(&format!("{k}.escalate_at_percent"), "must be between 1 and 100");
        }
        if b.max_actions.is_none() && b.max_spend.is_empty() && b.max_tokens.is_none() {
            cx.err(&k, "a budget needs max_actions, max_tokens or max_spend");
        }
        if b.max_tokens == Some(0) {
            cx.err(&format!("{k}.max_tokens"), "must be a positive integer");
        }
        budgets.push(Budget {
            window,
            scope: scope(cx, &format!("{k}.scope"), b.scope),
            max_actions: b.max_actions,
            max_tokens: b.max_tokens,
            escalate_at_percent: b.escalate_at_percent,
            max_spend: money(cx, &format!("{k}.max_spend"), b.max_spend),
        });
    }
    let mut rate_limits = Vec::new();
    for (i, r) in p.rate_limits.into_iter().enumerate() {
        let k = format!("policy.rate_limits[{i}]");
        match parse_rate(&r.rate) {
            Ok((count, per)) => {
                let burst = r.burst.unwrap_or(count);
                if burst == 0 {
                    cx.err(&format!("{k}.burst"), "must be at least 1");
                }
                rate_limits.push(RateLimit {
                    scope: scope(cx, &format!("{k}.scope"), r.scope),
                    count,
                    per,
                    burst,
                    raw: r.rate,
                });
            }
            Err(e) => cx.err(&format!("{k}.rate"), e),
        }
    }
    // Rules nothing can trigger are usually a typo; say so (a warning: the manifest still loads).
    let has_mcp = connectors.iter().any(|c| c.mcp.is_some());
    let actions: HashSet<&str> = connectors.iter().flat_map(|c| c.rules().map(|r| r.action.as_str())).collect();
    for (i, a) in approval.action_types.iter().enumerate() {
        if !(actions.contains(a.as_str()) || has_mcp && a.starts_with("mcp.")) {
            cx.warn(
                &format!("policy.approval.action_types[{i}]"),
                format!("no route or tool has the action {a:?}; this approval rule never triggers"),
            );
        }
    }
    for (i, name) in approval.connectors.iter().enumerate() {
        if connectors.iter().any(|c| &c.name == name && c.routes.is_empty() && c.mcp.is_none()) {
            cx.warn(
                &format!("policy.approval.connectors[{i}]"),
                format!("connector {name:?} has no routes; this approval rule never triggers"),
            );
        }
    }
    // Two connectors on one host and port: requests by host go to the first, the second's
    // routes and credentials apply only through its base URL.
    for (i, b) in connectors.iter().enumerate() {
        for (j, a) in connectors.iter().enumerate().take(i) {
            let shared = b.hosts.iter().find(|h| a.hosts.contains(h));
            let port = b.ports.iter().find(|p| a.ports.contains(p));
            if let (Some(h), Some(p)) = (shared, port) {
                cx.warn(
                    &format!("connectors[{i}].hosts"),
                    format!(
                        "{h}:{p} is also connectors[{j}] ({}): requests by host (explicit proxy, CONNECT, transparent) \
                         always go to connectors[{j}]",
                        a.name
                    ),
                );
            }
        }
    }
    // Money rules need an amount to act on: a manifest whose routes read none would let every
    // request through them unweighed.
    let reads_amount = connectors.iter().flat_map(|c| c.rules()).any(|r| r.declares("amount"));
    if !reads_amount {
        if !approval.amount_above.is_empty() {
            cx.err(
                "policy.approval.amount_above",
                "no route declares an `amount` param, so this threshold could never apply",
            );
        }
        for (i, b) in budgets.iter().enumerate() {
            if !b.max_spend.is_empty() {
                cx.err(
                    &format!("policy.budgets[{i}].max_spend"),
                    "no route declares an `amount` param, so this spend limit could never apply",
                );
            }
        }
    }
    // Token budgets count recorded usage, which only connectors with `usage` record.
    if !connectors.iter().any(|c| c.usage.is_some()) {
        for (i, b) in budgets.iter().enumerate() {
            if b.max_tokens.is_some() {
                cx.warn(
                    &format!("policy.budgets[{i}].max_tokens"),
                    "no connector of this manifest has `usage: openai | anthropic`, so no tokens are ever counted",
                );
            }
        }
    }
    let mut param_constraints = BTreeMap::new();
    for (name, c) in p.params {
        let k = format!("policy.params.{name}");
        let declared = connectors.iter().flat_map(|c| c.rules()).any(|r| r.declares(&name));
        if !declared {
            cx.warn(&k, format!("no route declares a param {name:?}; this constraint never applies"));
        }
        if c.allow.is_empty() && c.deny.is_empty() && c.min.is_none() && c.max.is_none() {
            cx.err(&k, "needs at least one of allow, deny, min, max");
        }
        let bound = |cx: &mut Cx, which: &str, v: Option<String>| {
            let v = v?;
            match Decimal::from_str_exact(v.trim()) {
                Ok(d) => Some(d),
                Err(_) => {
                    cx.err(
                        &format!("{k}.{which}"),
                        format!("{v:?} is not a decimal number (write it as a string, e.g. \"0.50\")"),
                    );
                    None
                }
            }
        };
        let min = bound(cx, "min", c.min);
        let max = bound(cx, "max", c.max);
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            cx.err(&format!("{k}.min"), format!("min {lo} is above max {hi}"));
        }
        for (list, values) in [("allow", &c.allow), ("deny", &c.deny)] {
            for (i, v) in values.iter().enumerate() {
                if v.trim().is_empty() {
                    cx.err(&format!("{k}.{list}[{i}]"), "must not be empty");
                }
            }
        }
        let values = AllowDeny {
            allow: c.allow.iter().map(|v| v.trim().to_string()).collect(),
            deny: c.deny.iter().map(|v| v.trim().to_string()).collect(),
        };
        param_constraints.insert(name, ParamConstraint { values, min, max });
    }
    let e = raw.escalation;
    let escalation = Escalation {
        mode: match e.mode.as_deref() {
            None | Some("reject") => EscalationMode::Reject,
            Some("hold") => EscalationMode::Hold,
            Some(o) => {
                cx.err("escalation.mode", format!("{o:?} is not one of reject, hold"));
                EscalationMode::Reject
            }
        },
        hold_timeout: duration(cx, "escalation.hold_timeout", e.hold_timeout, Duration::from_secs(120)),
        approval_ttl: duration(cx, "escalation.approval_ttl", e.approval_ttl, Duration::from_secs(86_400)),
        override_ttl: duration(cx, "escalation.override_ttl", e.override_ttl, Duration::from_secs(300)),
        max_pending: match e.max_pending {
            Some(0) => {
                cx.err("escalation.max_pending", "must be at least 1");
                1
            }
            Some(n) => n,
            None => 100,
        },
    };
    let a = raw.audit;
    let bodies = match a.bodies.as_deref() {
        None | Some("hash") => BodiesMode::Hash,
        Some("none") => BodiesMode::None,
        Some("full") => BodiesMode::Full,
        Some(o) => {
            cx.err("audit.bodies", format!("{o:?} is not one of none, hash, full"));
            BodiesMode::Hash
        }
    };
    let audit = ManifestAudit {
        bodies,
        redact_headers: a
            .redact_headers
            .unwrap_or_else(|| vec!["authorization".into(), "cookie".into(), "x-api-key".into()])
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
    };
    Manifest {
        agent: AgentInfo {
            id: raw.agent.id,
            name: raw.agent.name,
            owner: raw.agent.owner,
            description: raw.agent.description,
        },
        mode,
        capability,
        connectors,
        policy: Policy {
            connectors: allow_deny(p.connectors),
            action_types: allow_deny(p.action_types),
            amount_caps,
            approval,
            jurisdictions: allow_deny(p.jurisdictions),
            counterparties: allow_deny(p.counterparties),
            budgets,
            rate_limits,
            params: param_constraints,
        },
        escalation,
        audit,
        sha256,
        source: PathBuf::new(),
        files: Vec::new(),
    }
}
