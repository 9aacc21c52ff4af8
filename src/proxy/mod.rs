//! The data path. `handle` reads top to bottom in the order of the request flow:
//! parse → identify → classify (connector, route, action, params) → decide → reserve (budget,
//! rate) → audit `decision` (awaited durable) → inject credentials → forward → audit `outcome`
//! → respond. The policy engine decides; this module only gathers facts, enforces and moves
//! bytes.

mod agent_api;
mod body;
pub mod connect;
mod escalation;
mod hygiene;
mod respond;
pub mod ssrf;
pub mod tls;
pub mod transparent;
pub mod upstream;

use crate::approvals::{self, Approvals, Resolution, Status, approval_entry};
use crate::audit::{AuditError, AuditHandle, Fields};
use crate::config::{Connector, EscalationMode, GatewayConfig, Manifest, PolicyMode, PolicySet, Scheme};
use crate::identity::{CapabilityClaims, TokenVerifier};
use crate::limits::{BudgetCheck, Budgets, RateLimiters, Reservation, Spend};
use crate::policy::{self, Decision, Params, Reason, Verdict};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use respond::{DenyBody, deny_response};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

pub use body::RecordedBody;
use body::access_line;

pub use crate::response::{BoxError, ProxyBody, full_body, json_response};

/// Manifests plus one token verifier per agent (each with its own verified-token cache), swapped
/// as a whole on reload so in-flight requests finish under the policy they started with.
pub struct Policies {
    pub set: PolicySet,
    pub verifiers: HashMap<String, TokenVerifier>,
}

impl Policies {
    pub fn new(set: PolicySet) -> Policies {
        let verifiers = set
            .manifests
            .iter()
            .map(|(id, m)| (id.clone(), TokenVerifier::new(crate::identity::token_policy_for(m))))
            .collect();
        Policies { set, verifiers }
    }
}

/// Everything the data path shares.
pub struct Gateway {
    pub config: GatewayConfig,
    pub policies: ArcSwap<Policies>,
    pub audit: AuditHandle,
    pub budgets: Budgets,
    pub rate_limits: RateLimiters,
    pub approvals: Approvals,
    pub client: upstream::UpstreamClient,
    pub vetter: ssrf::Vetter,
    pub gateway_key: ed25519_dalek::SigningKey,
    pub token_file: Option<TokenFile>,
    pub metrics: crate::metrics::Metrics,
    pub draining: AtomicBool,
    /// Set when the gateway stops: held requests are answered 503.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Leaf certificates for intercepted tunnels (absent when no CA is configured).
    pub leaves: Option<tls::LeafCache>,
    /// The gateway's redb file (audit tables, approvals).
    pub db: crate::audit::SharedDb,
}

/// A capability token the gateway presents for the pod, re-read when it changes on disk
/// (projected tokens rotate).
pub struct TokenFile {
    path: std::path::PathBuf,
    cached: std::sync::Mutex<(Option<String>, Instant)>,
}

impl TokenFile {
    pub fn new(path: std::path::PathBuf) -> TokenFile {
        let token = std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string());
        TokenFile { path, cached: std::sync::Mutex::new((token, Instant::now())) }
    }
    fn get(&self) -> Option<String> {
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if c.1.elapsed() > Duration::from_secs(10) {
            *c = (std::fs::read_to_string(&self.path).ok().map(|t| t.trim().to_string()), Instant::now());
        }
        c.0.clone().filter(|t| !t.is_empty())
    }
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn new_request_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// How the request reached the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// `http://127.0.0.1:15080/<connector>/...`
    BaseUrl,
    /// Absolute-form request to the explicit proxy.
    Explicit,
    /// Inside an intercepted TLS tunnel.
    Tunnel,
    /// Plain HTTP caught by the transparent listener.
    Transparent,
}

impl Entry {
    fn as_str(self) -> &'static str {
        match self {
            Entry::BaseUrl => "base_url",
            Entry::Explicit => "explicit",
            Entry::Tunnel => "tunnel",
            Entry::Transparent => "transparent",
        }
    }
}

/// The facts of one request, filled in as they become known, and written as its `decision`
/// entry whatever the outcome.
pub(crate) struct Facts {
    request_id: String,
    entry: Entry,
    agent: Option<String>,
    token: Option<(String, Option<String>)>, // (iss, jti)
    connector: Option<String>,
    route: Option<String>,
    action: Option<String>,
    params: BTreeMap<String, String>,
    method: Method,
    scheme: Scheme,
    host: String,
    port: u16,
    path: String,
    query: Option<String>,
    body: Option<(String, u64)>, // (sha256 hex, length)
    headers: Map<String, Value>,
    /// The forwarded headers an override is bound to; filled in only when a request escalates.
    bound_headers: BTreeMap<String, Vec<String>>,
    mode: PolicyMode,
    started: Instant,
}

impl Facts {
    /// The `decision` entry's fields, written straight into canonical form.
    fn entry(&self, d: &Decision, approval_id: Option<&str>) -> Result<Fields, AuditError> {
        let mut f = Fields::new();
        f.str("kind", "decision")
            .str("request_id", &self.request_id)
            .str("via", self.entry.as_str())
            .opt_str("agent", self.agent.as_deref());
        if let Some((iss, jti)) = &self.token {
            f.value("token", &json!({"iss": iss, "jti": jti}))?;
        }
        f.opt_str("connector", self.connector.as_deref())
            .opt_str("route", self.route.as_deref())
            .opt_str("action", self.action.as_deref());
        f.value("params", &json!(self.params))?;
        f.str("method", self.method.as_str())
            .str("scheme", self.scheme.as_str())
            .str("host", &self.host)
            .int("port", self.port)
            .str("path", &self.path)
            .opt_str("query", self.query.as_deref());
        if let Some((sha, len)) = &self.body {
            f.str("body_sha256", sha).int("body_len", *len);
        }
        f.map("headers", &self.headers)?;
        f.str("decision", d.verdict.as_str());
        f.value("reasons", &json!(d.reasons))?;
        f.str("mode", self.mode.as_str());
        if let Some(id) = approval_id {
            f.str("approval_id", id);
        }
        Ok(f)
    }

    fn access(&self, d: &Decision) -> body::Access {
        body::Access {
            request_id: self.request_id.clone(),
            agent: self.agent.clone().unwrap_or_else(|| "-".into()),
            connector: self.connector.clone().unwrap_or_else(|| "-".into()),
            action: self.action.clone().unwrap_or_else(|| "-".into()),
            decision: d.verdict.as_str(),
            reasons: d.reasons.iter().map(|r| r.code).collect::<Vec<_>>().join(","),
            started: self.started,
        }
    }

    /// SHA-256 of the canonical action (SPEC §6): what an override token is bound to.
    fn action_hash(&self) -> String {
        let v = json!({
            "agent": self.agent, "connector": self.connector, "method": self.method.as_str(),
            "scheme": self.scheme.as_str(), "host": self.host, "port": self.port.to_string(),
            "path": self.path, "query": self.query,
            "body_sha256": self.body.as_ref().map(|b| b.0.clone()).unwrap_or_else(|| hex::encode(Sha256::digest(b""))),
            "action": self.action, "params": self.params, "headers": self.bound_headers,
        });
        let bytes = crate::audit::canonical_json(&v).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }
}

/// A response the proxy produced itself (not the upstream's).
fn refuse(
    status: StatusCode,
    facts: &Facts,
    d: &Decision,
    record: Option<u64>,
    extra: DenyBody,
) -> Response<ProxyBody> {
    deny_response(status, d, record, facts.agent.as_deref(), extra)
}

impl Gateway {
    /// Records a decision entry; a failure to commit is answered 503 and nothing is forwarded.
    async fn record(&self, facts: &Facts, d: &Decision, approval_id: Option<&str>) -> Result<u64, Response<ProxyBody>> {
        let started = Instant::now();
        let r = match facts.entry(d, approval_id) {
            Ok(fields) => self.audit.append_fields(fields).await,
            Err(e) => Err(e),
        };
        self.metrics.audit_append.observe(started.elapsed().as_secs_f64());
        r.map_err(|e| {
            let (code, msg) = match e {
                AuditError::QueueFull => ("audit_unavailable", "the audit queue is full; nothing was forwarded"),
                _ => ("audit_unavailable", "the audit log cannot commit; nothing was forwarded"),
            };
            tracing::error!(request_id = %facts.request_id, error = %e, "audit append failed");
            let d = Decision::deny(code, msg);
            deny_response(StatusCode::SERVICE_UNAVAILABLE, &d, None, facts.agent.as_deref(), DenyBody::default())
        })
    }

    /// Records `d` and answers with `status`.
    async fn refuse_recorded(&self, status: StatusCode, facts: &Facts, d: Decision) -> Response<ProxyBody> {
        match self.record(facts, &d, None).await {
            Ok(idx) => {
                let mut resp = refuse(status, facts, &d, Some(idx), DenyBody::default());
                if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
                    resp.headers_mut()
                        .insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"uapk-gateway\""));
                }
                self.finish_metrics(facts, &d, status, Some(idx));
                resp
            }
            Err(resp) => resp,
        }
    }

    /// Counts a decided request; the access-log line is written here for answers the gateway
    /// gives itself, and by the outcome for forwarded ones (which know their bytes then).
    fn finish_metrics(&self, facts: &Facts, d: &Decision, status: StatusCode, record: Option<u64>) {
        self.metrics.request(d.verdict.as_str(), facts.connector.as_deref(), facts.mode.as_str());
        access_line(&facts.access(d), status, 0, record, None, None);
    }
}

/// Splits `Proxy-Authorization` into (username, token): Basic uses the password, Bearer the
/// credential. Never logged.
pub(crate) fn proxy_auth_token(headers: &HeaderMap) -> Option<(Option<String>, String)> {
    use base64::Engine;
    let v = headers.get(header::PROXY_AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some((None, rest.trim().to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, pass) = text.split_once(':')?;
        return Some((Some(user.to_string()), pass.to_string()));
    }
    None
}

/// Step 1: who is calling. Returns the agent's manifest and verified claims, or a refusal.
pub(crate) fn identify(
    gw: &Gateway,
    policies: &Policies,
    headers: &HeaderMap,
    facts: &mut Facts,
    preset: Option<(Option<String>, String)>,
) -> Result<(Arc<Manifest>, Option<Arc<CapabilityClaims>>), Decision> {
    let mut basic_user = None;
    let from_proxy_auth = if facts.entry == Entry::Explicit { proxy_auth_token(headers) } else { None };
    let token = match preset.or(from_proxy_auth) {
        Some((user, tok)) => {
            basic_user = user;
            Some(tok)
        }
        _ => headers
            .get("x-uapk-capability")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
            .or_else(|| gw.token_file.as_ref().and_then(TokenFile::get)),
    };
    let default_agent = gw.config.identity.default_agent.as_deref();
    facts.agent = default_agent.map(str::to_string);
    let Some(token) = token else {
        let Some(agent) = default_agent else {
            return Err(Decision::deny("capability_token_required", "no capability token and no default agent"));
        };
        let Some(m) = policies.set.get(agent) else {
            return Err(Decision::deny("manifest_not_found", format!("no manifest for agent {agent}")));
        };
        facts.mode = m.mode;
        if m.capability.required {
            return Err(Decision::deny("capability_token_required", "this agent requires a capability token"));
        }
        return Ok((m.clone(), None));
    };
    let Some(sub) = crate::identity::unverified_subject(&token) else {
        return Err(Decision::deny("capability_token_invalid", "the capability token is malformed"));
    };
    let (Some(m), Some(verifier)) = (policies.set.get(&sub), policies.verifiers.get(&sub)) else {
        return Err(Decision::deny(
            "manifest_not_found",
            format!("no manifest for the agent the token names ({})", sanitize(&sub)),
        ));
    };
    facts.mode = m.mode;
    let claims = verifier.verify(&token, now_unix()).map_err(|e| Decision::deny(e.code(), e.message()))?;
    facts.agent = Some(claims.sub.clone());
    facts.token = Some((claims.iss.clone(), claims.jti.clone()));
    let user_names_other = basic_user.as_deref().is_some_and(|u| !u.is_empty() && u != "agent" && u != claims.sub);
    if default_agent.is_some_and(|d| d != claims.sub) || user_names_other {
        return Err(Decision::deny("token_agent_mismatch", "the capability token was issued to another agent"));
    }
    Ok((m.clone(), Some(claims)))
}

/// Agent-supplied text shown in messages: bounded and printable.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// A path the gateway refuses to interpret: dot segments or encoded separators could make the
/// upstream see another path than the one the routes matched.
fn ambiguous_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    // Encoded separators, encoded dots and double encoding (`%25`) could decode, at the upstream
    // or a server behind it, into a path other than the one the routes matched. A `;` starts
    // path parameters (`;jsessionid=`, `..;/`) that some servers strip before routing and others
    // keep, raw or encoded.
    ["%2f", "%5c", "%2e", "%25", "%3b", "\\", ";"].iter().any(|bad| lower.contains(bad))
        || path.split('/').any(|s| s == "." || s == "..")
}

/// The first path segment of the proxy listener that is the gateway's own (`/uapk/v1/...`),
/// never a connector.
pub const AGENT_API: &str = "uapk";

/// How a request reached the data path.
#[derive(Clone)]
pub enum Via {
    /// The proxy listener: base-URL (`/<connector>/...`) or absolute-form explicit proxy.
    Listener,
    /// A request inside an intercepted TLS tunnel (after CONNECT, or caught transparently).
    Tunnel(Arc<connect::Tunnel>),
    /// Plain HTTP caught by the transparent listener; the port is the original destination's.
    Transparent(std::net::SocketAddr),
}

/// The whole request path.
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>, via: Via) -> Response<ProxyBody> {
    let started = Instant::now();
    let resp = if req.method() == Method::CONNECT && matches!(via, Via::Listener) {
        connect::open(&gw, req).await
    } else {
        handle_inner(&gw, req, via).await
    };
    gw.metrics.request_duration.observe(started.elapsed().as_secs_f64());
    resp
}

/// A host as the gateway compares it: lower-case, without the one trailing dot that names the
/// same host (`API.Example.com.` is `api.example.com`). Empty or doubly dotted names are none.
pub fn normalize_host(h: &str) -> Option<String> {
    let h = h.strip_suffix('.').unwrap_or(h);
    (!h.is_empty() && !h.ends_with('.')).then(|| h.to_ascii_lowercase())
}

/// Host and optional port of an authority such as `api.example.com:443` or `[::1]:8443`; the
/// host is normalised by [`normalize_host`].
pub fn split_authority(a: &str) -> Option<(String, Option<u16>)> {
    let a = a.trim();
    if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if tail.is_empty() => None,
            None => return None,
        };
        return Some((normalize_host(h)?, port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((normalize_host(h)?, Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((normalize_host(a)?, None)),
    }
}

#[cfg(test)]
mod path_and_host_tests {
    use super::{ambiguous_path, normalize_host, split_authority};

    #[test]
    fn path_parameters_are_refused_like_dot_segments() {
        for p in [
            "/v1/refunds;jsessionid=abc",
            "/v1/charges/..;/refunds",
            "/v1/charges/x%3b/y",
            "/v1/charges/x%3B",
            "/v1;/charges",
            "/v1/../x",
            "/v1/%2e%2e/x",
        ] {
            assert!(ambiguous_path(p), "{p}");
        }
        for p in ["/v1/refunds", "/v1/charges/ch_1", "/v1/charges/x.", "/v1/a%20b"] {
            assert!(!ambiguous_path(p), "{p}");
        }
    }

    #[test]
    fn hosts_are_lower_case_without_a_trailing_dot() {
        assert_eq!(split_authority("API.Stripe.com.:443"), Some(("api.stripe.com".into(), Some(443))));
        assert_eq!(split_authority("api.stripe.com."), Some(("api.stripe.com".into(), None)));
        assert_eq!(split_authority("[::1]:8443"), Some(("::1".into(), Some(8443))));
        assert_eq!(split_authority("api.stripe.com..:443"), None);
        assert_eq!(split_authority(".:443"), None);
        assert_eq!(split_authority(":443"), None);
        assert_eq!(normalize_host("Shop.Test."), Some("shop.test".into()));
    }
}

pub(crate) fn new_facts(method: &Method, uri: &http::Uri, entry: Entry) -> Facts {
    Facts {
        request_id: new_request_id(),
        entry,
        agent: None,
        token: None,
        connector: None,
        route: None,
        action: None,
        params: BTreeMap::new(),
        method: method.clone(),
        scheme: Scheme::Http,
        host: String::new(),
        port: 0,
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        body: None,
        headers: Map::new(),
        bound_headers: BTreeMap::new(),
        mode: PolicyMode::Enforce,
        started: Instant::now(),
    }
}

async fn handle_inner(gw: &Arc<Gateway>, req: Request<Incoming>, via: Via) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let policies = gw.policies.load_full();
    let explicit = matches!(via, Via::Listener) && parts.uri.scheme().is_some();
    let entry = match &via {
        Via::Listener if explicit => Entry::Explicit,
        Via::Listener => Entry::BaseUrl,
        Via::Tunnel(_) => Entry::Tunnel,
        Via::Transparent(_) => Entry::Transparent,
    };
    let mut facts = new_facts(&parts.method, &parts.uri, entry);
    let mut preset_token = None;

    // ---- parse: where is this request going?
    // Both framings at once is how requests are smuggled past proxies (RFC 9112 §6.3): refuse.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) && parts.headers.contains_key(header::CONTENT_LENGTH) {
        let d = Decision::deny("malformed_request", "Content-Length and Transfer-Encoding together");
        return refuse(StatusCode::BAD_REQUEST, &facts, &d, None, DenyBody::default());
    }
    if parts.method == Method::CONNECT {
        let d = Decision::deny("malformed_request", "CONNECT is not allowed here");
        return refuse(StatusCode::METHOD_NOT_ALLOWED, &facts, &d, None, DenyBody::default());
    }
    let (base_connector, upstream_path) = match &via {
        Via::Tunnel(t) => {
            facts.scheme = Scheme::Https;
            facts.host = t.host.clone();
            facts.port = t.port;
            facts.agent = t.agent.clone();
            preset_token = t.token.clone();
            // Every request must name the tunnel's host (Host or :authority).
            let named = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string));
            let tunnel_host = normalize_host(&t.host);
            let same = named
                .as_deref()
                .and_then(split_authority)
                .is_some_and(|(h, p)| Some(&h) == tunnel_host.as_ref() && p.is_none_or(|p| p == t.port));
            if !same {
                let d = Decision::deny("misdirected_request", "the request names another host than the tunnel");
                return gw.refuse_recorded(StatusCode::MISDIRECTED_REQUEST, &facts, d).await;
            }
            (None, parts.uri.path().to_string())
        }
        Via::Transparent(orig) => {
            let Some((host, _)) =
                parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).and_then(split_authority)
            else {
                let d = Decision::deny("malformed_request", "a Host header is required");
                return refuse(StatusCode::BAD_REQUEST, &facts, &d, None, DenyBody::default());
            };
            facts.host = host;
            facts.port = orig.port();
            (None, parts.uri.path().to_string())
        }
        Via::Listener if explicit => {
            if parts.uri.scheme_str() != Some("http") {
                let d = Decision::deny(
                    "malformed_request",
                    "absolute-form requests must use http://; use CONNECT for https",
                );
                return refuse(StatusCode::BAD_REQUEST, &facts, &d, None, DenyBody::default());
            }
            let Some(host) =
                normalize_host(parts.uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']'))
            else {
                let d = Decision::deny("malformed_request", "the request target names no host");
                return refuse(StatusCode::BAD_REQUEST, &facts, &d, None, DenyBody::default());
            };
            let port = parts.uri.port_u16().unwrap_or(80);
            // The Host header must agree with the absolute-form target.
            if let Some(h) = parts.headers.get(header::HOST) {
                let same = h
                    .to_str()
                    .ok()
                    .and_then(split_authority)
                    .is_some_and(|(hh, hp)| hh == host && hp.unwrap_or(80) == port);
                if !same {
                    let d = Decision::deny("malformed_request", "the Host header does not match the request target");
                    return refuse(StatusCode::BAD_REQUEST, &facts, &d, None, DenyBody::default());
                }
            }
            facts.host = host;
            facts.port = port;
            (None, parts.uri.path().to_string())
        }
        Via::Listener => {
            let raw = parts.uri.path();
            let rest = raw.strip_prefix('/').unwrap_or(raw);
            let (name, tail) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if name.is_empty() {
                let d = Decision::deny("route_not_allowed", "name a connector: /<connector>/<path>");
                return refuse(StatusCode::NOT_FOUND, &facts, &d, None, DenyBody::default());
            }
            (Some(name.to_string()), tail.to_string())
        }
    };
    if ambiguous_path(&upstream_path) {
        let d =
            Decision::deny("malformed_request", "the path has dot segments, path parameters (;) or encoded separators");
        return gw.refuse_recorded(StatusCode::BAD_REQUEST, &facts, d).await;
    }

    // ---- identify
    let (manifest, claims) = match identify(gw, &policies, &parts.headers, &mut facts, preset_token) {
        Ok(ok) => ok,
        Err(d) => {
            let status =
                if explicit && (d.code().starts_with("capability_token_") || d.code() == "token_agent_mismatch") {
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED
                } else {
                    StatusCode::FORBIDDEN
                };
            if let Some(name) = &base_connector {
                facts.connector = Some(sanitize(name));
            }
            return gw.refuse_recorded(status, &facts, d).await;
        }
    };
    facts.headers = hygiene::recorded_headers(&parts.headers, &manifest.audit.redact_headers);
    if base_connector.as_deref() == Some(AGENT_API) {
        return agent_api::serve(gw, &mut facts, &parts.method, &upstream_path).await;
    }
    if let Some(why) = hygiene::upgrade_refusal(&parts.method, &parts.headers) {
        return gw.refuse_recorded(StatusCode::BAD_REQUEST, &facts, Decision::deny("upgrade_not_allowed", why)).await;
    }

    // ---- classify: connector
    let connector: Arc<Connector> = match &base_connector {
        Some(name) => match manifest.connector(name) {
            Some(c) if c.base_url.is_some() => {
                let b = c.base_url.as_ref().expect("checked");
                facts.scheme = b.scheme;
                facts.host = b.host.clone();
                facts.port = b.port;
                facts.path = format!("{}{}", b.path_prefix, upstream_path);
                c.clone()
            }
            Some(_) => {
                facts.connector = Some(name.clone());
                let d = Decision::deny("tool_not_allowed", format!("connector {name} has no base_url"));
                return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, d).await;
            }
            None => {
                facts.connector = Some(sanitize(name));
                let d = Decision::deny("tool_not_allowed", format!("no connector named {}", sanitize(name)));
                return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, d).await;
            }
        },
        None => {
            let found = manifest.connectors.iter().find(|c| c.matches_host(&facts.host) && c.matches_port(facts.port));
            match found {
                Some(c) => c.clone(),
                None => {
                    let d = Decision::deny(
                        "host_not_allowed",
                        format!("{}:{} belongs to no connector of this agent", sanitize(&facts.host), facts.port),
                    );
                    return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, d).await;
                }
            }
        }
    };
    facts.connector = Some(connector.name.clone());
    if let Err(d) = policy::check_connector(&manifest, claims.as_deref(), &connector) {
        return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, d).await;
    }
    if let Some(d) = cleartext_refusal(&facts, &connector) {
        return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, d).await;
    }

    // ---- classify: route
    let route_path = facts.path.clone();
    let Some((route, captures)) = connector.route(&facts.method, &route_path) else {
        let d =
            Decision::deny("route_not_allowed", format!("{} {} matches no route", facts.method, sanitize(&route_path)));
        return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, d).await;
    };
    facts.route = Some(route.path.raw.clone());
    facts.action = Some(route.action.clone());

    // ---- body: buffered only when the route reads body params (or an escalation needs its hash)
    let limit = gw.config.limits.max_body_bytes;
    let mut body = Some(body);
    let mut buffered: Option<Bytes> = None;
    if route.needs_body() {
        match buffer_body(body.take().expect("body"), &parts.headers, &gw.config.limits).await {
            Ok(b) => {
                facts.body = Some((hex::encode(Sha256::digest(&b)), b.len() as u64));
                buffered = Some(b);
            }
            Err(status) => {
                let d = body_refusal(status, limit);
                return gw.refuse_recorded(status, &facts, d).await;
            }
        }
    }

    // A route that reads body params reads them only from its declared media type, as the
    // upstream decides by Content-Type: anything else is refused, never guessed at.
    if let Some(b) = &buffered
        && let Err(d) = policy::check_body_media_type(route, &parts.headers, b)
    {
        let status = if d.code() == "unsupported_media_type" {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else {
            StatusCode::FORBIDDEN
        };
        return gw.refuse_recorded(status, &facts, d).await;
    }

    // ---- classify: params
    let params: Params =
        policy::extract_params(route, &captures, &parts.headers, facts.query.as_deref(), buffered.as_deref());
    facts.params = params.values.clone();

    // ---- decide (steps 3–7)
    let mut decision = policy::evaluate(
        &manifest,
        claims.as_deref(),
        &policy::Action { connector: &connector, route, params: &params },
    );

    // ---- reserve budget (step 8); also without budgets, so counters are what a rebuild from
    // the log finds when a reload adds one
    let mut reservation: Option<Reservation> = None;
    if decision.verdict != Verdict::Deny {
        match gw.budgets.reserve(&manifest, spend_of(&manifest, &connector, route, &params)) {
            BudgetCheck::Exceeded(r) => decision = Decision { verdict: Verdict::Deny, reasons: vec![r] },
            BudgetCheck::Reserved { reservation: res, threshold } => {
                reservation = Some(res);
                if let Some(r) = threshold {
                    decision = match decision.verdict {
                        Verdict::Escalate => {
                            let mut d = decision;
                            d.reasons.push(r);
                            d
                        }
                        _ => Decision::escalate(vec![r]),
                    };
                }
            }
        }
    }

    // ---- escalation and override (step 10)
    let mut consumed_approval: Option<String> = None;
    if decision.verdict == Verdict::Escalate {
        facts.bound_headers = hygiene::bound_headers(&parts.headers, &connector);
        // The action hash covers the body, so an escalated request's body is read now.
        if facts.body.is_none() {
            match buffer_body(body.take().expect("body"), &parts.headers, &gw.config.limits).await {
                Ok(b) => {
                    facts.body = Some((hex::encode(Sha256::digest(&b)), b.len() as u64));
                    buffered = Some(b);
                }
                Err(status) => {
                    release(gw, reservation.take());
                    let d = body_refusal(status, limit);
                    return gw.refuse_recorded(status, &facts, d).await;
                }
            }
        }
        if let Some(tok) = parts.headers.get("x-uapk-override").and_then(|v| v.to_str().ok()) {
            match check_override(gw, &facts, tok).await {
                Ok(approval_id) => {
                    let mut d = Decision::allow();
                    d.reasons.push(Reason::new("override_accepted", format!("approved by {approval_id}")));
                    decision = d;
                    consumed_approval = Some(approval_id);
                }
                Err(d) => decision = d,
            }
        }
    }
    if decision.verdict == Verdict::Deny {
        release(gw, reservation.take());
    }

    // ---- rate limits (step 9): only requests about to be forwarded take quota; every limit
    // that applies is checked before any is taken, and the quota goes back (when `rate_taken`
    // drops uncommitted) if the request is refused after all (SSRF guard, audit failure)
    let dry_run = manifest.mode == PolicyMode::DryRun;
    let (mut rate_taken, mut limited) = (None, None);
    if decision.verdict == Verdict::Allow {
        match gw.rate_limits.check(&manifest, &connector.name, &route.action) {
            Ok(taken) => rate_taken = Some(taken),
            Err(refusal) => limited = Some(refusal),
        }
    }
    if let Some(limited) = limited {
        release(gw, reservation.take());
        let d = Decision { verdict: Verdict::Deny, reasons: vec![limited.reason.clone()] };
        if !dry_run {
            let idx = match gw.record(&facts, &d, None).await {
                Ok(i) => i,
                Err(resp) => return resp,
            };
            let mut resp = refuse(StatusCode::TOO_MANY_REQUESTS, &facts, &d, Some(idx), DenyBody::default());
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(limited.retry_after.as_secs()));
            if let Ok(v) = HeaderValue::from_str(&limited.policy) {
                h.insert("ratelimit-policy", v);
            }
            if let Ok(v) = HeaderValue::from_str(&limited.limit) {
                h.insert("ratelimit", v);
            }
            gw.finish_metrics(&facts, &d, StatusCode::TOO_MANY_REQUESTS, Some(idx));
            return resp;
        }
        decision = d;
    }

    // ---- refusals (enforce mode)
    if !dry_run {
        match decision.verdict {
            Verdict::Deny => return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, decision).await,
            Verdict::Escalate => {
                release(gw, reservation.take());
                match escalate(gw, &facts, &manifest, decision).await {
                    Escalated::Respond(resp) => return resp,
                    Escalated::Approved(id) => {
                        // Approved while held: consume the approval, then count the budget again.
                        let consumed =
                            gw.approvals.transition(&id, Status::Approved, Status::Consumed, now_unix()).await;
                        if consumed.is_err() {
                            let d = Decision::deny("override_token_already_used", "the approval was already used");
                            return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, d).await;
                        }
                        match gw.budgets.reserve(&manifest, spend_of(&manifest, &connector, route, &params)) {
                            BudgetCheck::Exceeded(r) => {
                                let d = Decision { verdict: Verdict::Deny, reasons: vec![r] };
                                return gw.refuse_recorded(StatusCode::FORBIDDEN, &facts, d).await;
                            }
                            BudgetCheck::Reserved { reservation: r, .. } => reservation = Some(r),
                        }
                        let mut d = Decision::allow();
                        d.reasons.push(Reason::new("approval_granted", format!("approved in {id}")));
                        decision = d;
                        consumed_approval = Some(id);
                    }
                }
            }
            Verdict::Allow => {}
        }
    }

    // ---- SSRF guard (step 2's address check), only for requests that are about to go out:
    // resolved once, every address classified; the client dials only what was vetted.
    if decision.verdict == Verdict::Allow || dry_run {
        let refusal = match gw.vetter.vet(&facts.host, facts.port).await {
            ssrf::Vetted::Ok => None,
            ssrf::Vetted::Blocked(why) => Some((StatusCode::FORBIDDEN, Decision::deny("ssrf_blocked", why))),
            ssrf::Vetted::Unresolvable(why) => {
                Some((StatusCode::BAD_GATEWAY, Decision::deny("upstream_unresolvable", why)))
            }
        };
        if let Some((status, d)) = refusal {
            release(gw, reservation.take());
            return gw.refuse_recorded(status, &facts, d).await;
        }
    }

    // ---- audit the decision, durably, before anything leaves
    let idx = match gw.record(&facts, &decision, consumed_approval.as_deref()).await {
        Ok(i) => i,
        Err(resp) => {
            release(gw, reservation.take());
            return resp;
        }
    };
    if let Some(r) = reservation.take() {
        // One rule with the rebuild from the log (a dry-run escalation is forwarded, not counted).
        if crate::limits::counts_toward_budgets(decision.verdict.as_str(), facts.route.as_deref()) {
            r.commit();
        } else {
            gw.budgets.release(r);
        }
    }
    if let Some(t) = rate_taken.take() {
        t.commit();
    }
    if let Some(id) = &consumed_approval {
        let e = approval_entry(id, "consumed", facts.agent.as_deref(), &[("request_id", json!(facts.request_id))]);
        let _ = gw.audit.append_nowait(e);
    }

    // ---- forward
    let would_deny = (dry_run && decision.verdict != Verdict::Allow).then(|| decision.code());
    let req_body = match (buffered, body) {
        (Some(b), _) => full_body(b),
        (None, Some(b)) => b.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        (None, None) => full_body(Bytes::new()),
    };
    let mut resp = forward(gw, &facts, &connector, parts, req_body, idx, facts.access(&decision)).await;
    if let Some(code) = would_deny {
        resp.headers_mut().insert("x-uapk-would-deny", HeaderValue::from_static(code));
    }
    gw.metrics.request(decision.verdict.as_str(), facts.connector.as_deref(), facts.mode.as_str());
    resp
}

/// Credentials never travel in cleartext (SPEC §14.2): a plain-HTTP request (absolute-form or
/// transparent) to a connector whose `base_url` is `https://`, or that injects credentials and
/// has no `base_url` to say plain HTTP is intended, is refused before anything is dialled.
fn cleartext_refusal(facts: &Facts, connector: &Connector) -> Option<Decision> {
    if facts.scheme != Scheme::Http {
        return None;
    }
    let refused = match &connector.base_url {
        Some(b) => b.scheme == Scheme::Https,
        None => connector.injects_credentials(),
    };
    refused.then(|| {
        Decision::deny(
            "cleartext_not_allowed",
            format!("connector {} is reached only over TLS; use https:// (CONNECT) or its base URL", connector.name),
        )
    })
}

fn spend_of(manifest: &Manifest, connector: &Connector, route: &crate::config::Route, params: &Params) -> Spend {
    Spend {
        agent: manifest.agent.id.clone(),
        connector: connector.name.clone(),
        action: route.action.clone(),
        amount: params.amount.map(|a| (a, params.currency.clone().unwrap_or_default())),
        at: now_unix(),
    }
}

fn release(gw: &Gateway, r: Option<Reservation>) {
    if let Some(r) = r {
        gw.budgets.release(r);
    }
}

fn body_refusal(status: StatusCode, limit: usize) -> Decision {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        Decision::deny("body_too_large", format!("the request body exceeds limits.max_body_bytes ({limit} bytes)"))
    } else if status == StatusCode::REQUEST_TIMEOUT {
        Decision::deny("body_timeout", "the request body did not arrive within limits.body_read_timeout")
    } else {
        Decision::deny("malformed_request", "the request body could not be read")
    }
}

/// Reads a whole body up to `limit` bytes: 413 above it, 400 if the peer fails mid-body.
async fn buffer_body(body: Incoming, headers: &HeaderMap, limits: &crate::config::Limits) -> Result<Bytes, StatusCode> {
    let limit = limits.max_body_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    match tokio::time::timeout(limits.body_read_timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(StatusCode::REQUEST_TIMEOUT),
        Ok(r) => match r {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                Err(StatusCode::PAYLOAD_TOO_LARGE)
            }
            Err(_) => Err(StatusCode::BAD_REQUEST),
        },
    }
}

/// Step 10: an override token lifts ESCALATE for the identical action, once.
async fn check_override(gw: &Gateway, facts: &Facts, token: &str) -> Result<String, Decision> {
    let invalid = |m: &str| Decision::deny("override_token_invalid", m.to_string());
    let claims = crate::identity::verify_override(token, &gw.gateway_key.verifying_key(), now_unix())
        .map_err(|_| invalid("the override token is not valid"))?;
    if Some(&claims.sub) != facts.agent.as_ref() {
        return Err(invalid("the override token was issued to another agent"));
    }
    if claims.action_hash != facts.action_hash() {
        return Err(invalid("the override token was issued for a different action"));
    }
    let now = now_unix();
    gw.approvals.transition(&claims.approval_id, Status::Approved, Status::Consumed, now).await.map_err(
        |e| match e {
            approvals::ApprovalError::NotPending { status: "consumed", .. } => {
                Decision::deny("override_token_already_used", "the override token was already used")
            }
            _ => invalid("the approval behind the override token is not approved"),
        },
    )?;
    Ok(claims.approval_id)
}

enum Escalated {
    Respond(Response<ProxyBody>),
    /// A held request was approved: it proceeds under this approval.
    Approved(String),
}

/// ESCALATE: store a pending approval and record it; `reject` answers 403 with its id, `hold`
/// waits for the decision.
async fn escalate(gw: &Arc<Gateway>, facts: &Facts, manifest: &Manifest, decision: Decision) -> Escalated {
    // One agent cannot pile up approvals (memory, the operator's list): past its
    // `max_pending` the escalation is a refusal, recorded like any other.
    let agent = facts.agent.clone().unwrap_or_default();
    let max = manifest.escalation.max_pending;
    if let Err(pending) = gw.approvals.reserve(&agent, max) {
        let d = Decision::deny(
            "too_many_pending_approvals",
            format!("{pending} approvals of this agent are pending (escalation.max_pending {max}); wait for decisions"),
        );
        return Escalated::Respond(gw.refuse_recorded(StatusCode::FORBIDDEN, facts, d).await);
    }
    let id = approvals::new_id();
    let idx = match gw.record(facts, &decision, Some(&id)).await {
        Ok(i) => i,
        Err(resp) => {
            gw.approvals.unreserve(&agent);
            return Escalated::Respond(resp);
        }
    };
    let now = now_unix();
    let approval = approvals::Approval {
        id: id.clone(),
        agent: facts.agent.clone().unwrap_or_default(),
        connector: facts.connector.clone().unwrap_or_default(),
        action: facts.action.clone().unwrap_or_default(),
        params: facts.params.clone(),
        method: facts.method.to_string(),
        scheme: facts.scheme.as_str().to_string(),
        host: facts.host.clone(),
        port: facts.port,
        path: facts.path.clone(),
        query: facts.query.clone(),
        headers: facts.bound_headers.clone(),
        body_sha256: facts.body.as_ref().map(|b| b.0.clone()),
        body_len: facts.body.as_ref().map(|b| b.1),
        action_hash: facts.action_hash(),
        reasons: decision
            .reasons
            .iter()
            .map(|r| approvals::ReasonRecord { code: r.code.to_string(), message: r.message.clone() })
            .collect(),
        status: Status::Pending,
        created_at: now,
        expires_at: now + manifest.escalation.approval_ttl.as_secs() as i64,
        record: idx,
        note: None,
        decided_by: None,
        override_expires_at: None,
    };
    if gw.approvals.store(approval).await.is_err() {
        tracing::error!(approval_id = %id, "cannot store approval");
        let d = Decision::deny("approval_store_unavailable", "the approval could not be stored");
        return Escalated::Respond(refuse(StatusCode::SERVICE_UNAVAILABLE, facts, &d, Some(idx), DenyBody::default()));
    }
    let created = approval_entry(&id, "created", facts.agent.as_deref(), &[("request_id", json!(facts.request_id))]);
    let _ = gw.audit.append_nowait(created);
    if manifest.escalation.mode == EscalationMode::Hold {
        let d = match escalation::hold(gw, facts, &id, manifest.escalation.hold_timeout).await {
            Resolution::Approved => return Escalated::Approved(id),
            Resolution::Denied => Decision::deny("approval_denied", format!("approval {id} was denied")),
            Resolution::TimedOut => {
                Decision::deny("approval_timeout", format!("approval {id} was not decided in time"))
            }
            Resolution::ShuttingDown => {
                let d = Decision::deny("shutting_down", "the gateway is shutting down; retry");
                let resp =
                    refuse(StatusCode::SERVICE_UNAVAILABLE, facts, &d, Some(idx), DenyBody { approval_id: Some(id) });
                return Escalated::Respond(resp);
            }
        };
        return Escalated::Respond(gw.refuse_recorded(StatusCode::FORBIDDEN, facts, d).await);
    }
    let mut resp =
        refuse(StatusCode::FORBIDDEN, facts, &decision, Some(idx), DenyBody { approval_id: Some(id.clone()) });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-uapk-approval", v);
    }
    gw.finish_metrics(facts, &decision, StatusCode::FORBIDDEN, Some(idx));
    Escalated::Respond(resp)
}

/// Sends the request upstream with the connector's credentials and streams the answer back;
/// the `outcome` entry is written when the response body ends.
async fn forward(
    gw: &Arc<Gateway>,
    facts: &Facts,
    connector: &Connector,
    parts: http::request::Parts,
    body: ProxyBody,
    record: u64,
    access: body::Access,
) -> Response<ProxyBody> {
    let host = if facts.host.contains(':') { format!("[{}]", facts.host) } else { facts.host.clone() };
    let default_port = matches!((facts.scheme, facts.port), (Scheme::Http, 80) | (Scheme::Https, 443));
    let authority = if default_port { host } else { format!("{host}:{}", facts.port) };
    let pq = match &facts.query {
        Some(q) => format!("{}?{q}", facts.path),
        None => facts.path.clone(),
    };
    let uri = match format!("{}://{authority}{pq}", facts.scheme.as_str()).parse::<http::Uri>() {
        Ok(u) => u,
        Err(_) => {
            let d = Decision::deny("malformed_request", "the upstream URI is invalid");
            return refuse(StatusCode::BAD_REQUEST, facts, &d, Some(record), DenyBody::default());
        }
    };
    let mut parts = parts;
    // An upgrade (WebSocket) keeps its Upgrade/Connection pair; the tunnel is spliced after 101.
    let upgrade = hygiene::requested_upgrade(&parts.headers);
    let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let mut headers = parts.headers;
    hygiene::strip_request(&mut headers);
    hygiene::strip_for_connector(&mut headers, connector);
    crate::usage::prepare_request(&mut headers, connector);
    if let Some(proto) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    let creds = connector.credentials.as_ref().map(Vec::as_slice).unwrap_or_default();
    for (name, value) in creds {
        headers.append(name.clone(), value.clone());
    }
    let mut up = Request::builder().method(parts.method).uri(uri).version(http::Version::HTTP_11);
    if let Some(h) = up.headers_mut() {
        *h = headers;
    }
    let up = match up.body(body) {
        Ok(r) => r,
        Err(_) => {
            let d = Decision::deny("malformed_request", "the request cannot be forwarded");
            return refuse(StatusCode::BAD_REQUEST, facts, &d, Some(record), DenyBody::default());
        }
    };
    let sent = Instant::now();
    let result = tokio::time::timeout(gw.config.limits.upstream_timeout, gw.client.request(up)).await;
    let latency = sent.elapsed();
    gw.metrics.upstream_duration.observe(latency.as_secs_f64());
    let outcome = body::Outcome {
        audit: gw.audit.clone(),
        request_id: facts.request_id.clone(),
        record,
        upstream_latency: latency,
        access,
        usage: body::UsageHook::new(connector.usage, &gw.budgets),
    };
    // Only the WebSocket switch the agent asked for is spliced; an upstream that switches to
    // anything else, or unasked, would leave a raw connection no policy reads.
    let switched_to_websocket = |r: &Response<Incoming>| {
        client_upgrade.is_some()
            && r.headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
    };
    match result {
        Ok(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !switched_to_websocket(&resp) => {
            let (status, msg) = (StatusCode::BAD_GATEWAY, "the upstream switched to a protocol that was not allowed");
            outcome.write(status, 0, None, Some(msg));
            let d = Decision::deny("upstream_unavailable", msg);
            refuse(status, facts, &d, Some(record), DenyBody::default())
        }
        Ok(Ok(mut resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let client_upgrade = client_upgrade.expect("checked");
            tokio::spawn(async move {
                let (c, u) = match tokio::join!(client_upgrade, upstream_upgrade) {
                    (Ok(c), Ok(u)) => (c, u),
                    _ => {
                        outcome.write(StatusCode::SWITCHING_PROTOCOLS, 0, None, Some("the upgrade did not complete"));
                        return;
                    }
                };
                let (mut c, mut u) = (hyper_util::rt::TokioIo::new(c), hyper_util::rt::TokioIo::new(u));
                let r = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                let bytes = r.as_ref().map_or(0, |(a, b)| a + b);
                outcome.write(
                    StatusCode::SWITCHING_PROTOCOLS,
                    bytes,
                    None,
                    r.err().map(|_| "the upgraded connection ended with an error"),
                );
            });
            let (mut rp, _) = resp.into_parts();
            let proto = rp.headers.get(header::UPGRADE).cloned();
            hygiene::strip_response(&mut rp.headers);
            if let Some(p) = proto {
                rp.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                rp.headers.insert(header::UPGRADE, p);
            }
            rp.headers.insert("x-uapk-record", HeaderValue::from(record));
            Response::from_parts(rp, full_body(Bytes::new()))
        }
        Ok(Ok(resp)) => {
            let (mut rp, rb) = resp.into_parts();
            hygiene::strip_response(&mut rp.headers);
            rp.headers.insert("x-uapk-record", HeaderValue::from(record));
            let body = RecordedBody::new(rb.map_err(|e| Box::new(e) as BoxError).boxed_unsync(), outcome, &rp);
            Response::from_parts(rp, body.boxed_unsync())
        }
        Ok(Err(e)) => {
            let (status, msg) = upstream_error(&e);
            outcome.write(status, 0, None, Some(msg));
            let d = Decision::deny("upstream_unavailable", msg);
            refuse(status, facts, &d, Some(record), DenyBody::default())
        }
        Err(_) => {
            let status = StatusCode::GATEWAY_TIMEOUT;
            let msg = "the upstream did not answer within limits.upstream_timeout";
            outcome.write(status, 0, None, Some(msg));
            let d = Decision::deny("upstream_timeout", msg);
            refuse(status, facts, &d, Some(record), DenyBody::default())
        }
    }
}

fn upstream_error(e: &hyper_util::client::legacy::Error) -> (StatusCode, &'static str) {
    let text = format!("{e:?}");
    if text.contains("certificate") || text.contains("InvalidCertificate") || text.contains("AlertReceived") {
        (StatusCode::BAD_GATEWAY, "the upstream TLS handshake failed")
    } else if e.is_connect() {
        if text.contains("TimedOut") || text.contains("timed out") {
            (StatusCode::GATEWAY_TIMEOUT, "connecting to the upstream timed out")
        } else {
            (StatusCode::BAD_GATEWAY, "the upstream is unreachable")
        }
    } else {
        (StatusCode::BAD_GATEWAY, "the upstream failed before answering")
    }
}

#[cfg(test)]
mod tests;
