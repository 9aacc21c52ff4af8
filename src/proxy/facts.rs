//! What is recorded of one request: its `decision` entry, assembled from one typed record per
//! stage. Each record has one owner that fills it in — the request line (`target`, then the
//! connector's base URL in `classify`, or the tunnel in `connect`), the caller (`identify`), the
//! action (`classify`, `mcp`, `connect`, `agent_api`), the body (the small body read) and what
//! settling binds (`settle`, `forward`) — and writes its own fields into the entry. A request
//! refused at any stage is recorded with the records filled in so far.

use super::Arrival;
use super::body;
use crate::audit::{AuditError, Fields};
use crate::config::{BodiesMode, PolicyMode, Scheme};
use crate::policy::Decision;
use http::Method;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Instant;

/// The request line as the upstream will read it: method, scheme, host, port, path, query.
pub(crate) struct RequestLine {
    pub(crate) method: Method,
    pub(crate) scheme: Scheme,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
}

impl RequestLine {
    /// Where the request goes (the target stage, a connector's base URL, a tunnel's authority).
    pub(crate) fn aim(&mut self, scheme: Scheme, host: String, port: u16) {
        (self.scheme, self.host, self.port) = (scheme, host, port);
    }

    /// A tunnel to `host:port` (CONNECT, or TLS caught transparently): https, no path.
    pub(crate) fn tunnel(&mut self, host: String, port: u16) {
        self.aim(Scheme::Https, host, port);
        self.path.clear();
    }

    fn record(&self, f: &mut Fields) {
        f.str("method", self.method.as_str())
            .str("scheme", self.scheme.as_str())
            .str("host", &self.host)
            .int("port", self.port)
            .str("path", &self.path)
            .opt_str("query", self.query.as_deref());
    }
}

/// Who sent the request: the agent (a default agent, the tunnel's, or a verified token's
/// subject), the token's issuer and id, and the mode of the agent's manifest.
pub(crate) struct Caller {
    pub(crate) agent: Option<String>,
    /// `(iss, jti)` of a verified capability token.
    pub(crate) token: Option<(String, Option<String>)>,
    pub(crate) mode: PolicyMode,
}

impl Caller {
    /// The subject and the token's issuer and id of a verified capability token.
    pub(crate) fn verified(&mut self, claims: &crate::identity::CapabilityClaims) {
        self.agent = Some(claims.sub.clone());
        self.token = Some((claims.iss.clone(), claims.jti.clone()));
    }

    fn record(&self, f: &mut Fields) -> Result<(), AuditError> {
        f.opt_str("agent", self.agent.as_deref());
        if let Some((iss, jti)) = &self.token {
            f.value("token", &json!({"iss": iss, "jti": jti}))?;
        }
        f.str("mode", self.mode.as_str());
        Ok(())
    }
}

/// What the request does: its connector, route, action and params; for MCP, the JSON-RPC
/// method and the tool, prompt or resource it names.
#[derive(Default)]
pub(crate) struct ActionRecord {
    pub(crate) connector: Option<String>,
    pub(crate) route: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) params: BTreeMap<String, String>,
    /// An MCP message's method and the tool, prompt or resource it names.
    pub(crate) mcp: Option<(String, Option<String>)>,
    /// The id of a JSON-RPC request (MCP): its refusals are answered as JSON-RPC errors.
    pub(crate) jsonrpc_id: Option<Value>,
    /// What an override binds instead of the body's hash (an MCP call: method and params, not
    /// the JSON-RPC id a retry renews).
    pub(crate) bound_body: Option<String>,
}

impl ActionRecord {
    fn record(&self, f: &mut Fields) -> Result<(), AuditError> {
        f.opt_str("connector", self.connector.as_deref())
            .opt_str("route", self.route.as_deref())
            .opt_str("action", self.name.as_deref());
        f.value("params", &json!(self.params))?;
        if let Some((method, name)) = &self.mcp {
            f.str("mcp_method", method).opt_str("mcp_name", name.as_deref());
        }
        Ok(())
    }
}

/// The request body as recorded (`audit.bodies`; `full` only on a `safe` route).
pub(crate) struct BodyRecord {
    /// `(sha256 hex, length)` once the body is read.
    pub(crate) hash: Option<(String, u64)>,
    pub(crate) mode: BodiesMode,
    /// The buffered body, kept to be recorded when `mode` is `full`.
    pub(crate) full: Option<bytes::Bytes>,
}

impl BodyRecord {
    fn record(&self, f: &mut Fields) {
        // `audit.bodies: none` records no body hash (the override's action hash still binds it).
        if let Some((sha, len)) = self.hash.as_ref().filter(|_| self.mode != BodiesMode::None) {
            f.str("body_sha256", sha).int("body_len", *len);
            if let (BodiesMode::Full, Some(b)) = (self.mode, &self.full) {
                let mut sha256 = [0u8; 32];
                let _ = hex::decode_to_slice(sha, &mut sha256);
                body::record_full_body(f, "body", b, sha256, *len);
            }
        }
    }
}

/// What settling binds and charges.
#[derive(Default)]
pub(crate) struct Settled {
    /// The forwarded headers an override is bound to; filled in only when a request escalates.
    pub(crate) bound_headers: BTreeMap<String, Vec<String>>,
    /// The `jti` of the override token a request goes out under (recorded with its decision).
    pub(crate) override_jti: Option<String>,
    /// The tokens an LLM call reserves and is charged when its usage cannot be read (SPEC §16.1).
    pub(crate) token_estimate: Option<u64>,
}

/// The facts of one request, one record per stage (see the module documentation), written as
/// its `decision` entry whatever the outcome.
pub(crate) struct Facts {
    pub(crate) request_id: String,
    pub(crate) arrival: Arrival,
    pub(crate) line: RequestLine,
    pub(crate) caller: Caller,
    pub(crate) action: ActionRecord,
    pub(crate) body: BodyRecord,
    /// The request headers as recorded (the manifest's `audit.redact_headers` applied).
    pub(crate) headers: Map<String, Value>,
    pub(crate) settled: Settled,
    pub(crate) started: Instant,
    /// The request's trace (its id recorded as `trace_id` when known) and span.
    pub(crate) trace: crate::telemetry::RequestTrace,
}

impl Facts {
    /// The facts known when a request arrives: its id, how it came, its request line.
    pub(crate) fn new(method: &Method, uri: &http::Uri, arrival: Arrival) -> Facts {
        Facts {
            request_id: new_request_id(),
            arrival,
            line: RequestLine {
                method: method.clone(),
                scheme: Scheme::Http,
                host: String::new(),
                port: 0,
                path: uri.path().to_string(),
                query: uri.query().map(str::to_string),
            },
            caller: Caller { agent: None, token: None, mode: PolicyMode::Enforce },
            action: ActionRecord::default(),
            body: BodyRecord { hash: None, mode: BodiesMode::Hash, full: None },
            headers: Map::new(),
            settled: Settled::default(),
            started: crate::clock::instant(),
            trace: crate::telemetry::RequestTrace::default(),
        }
    }

    /// The `decision` entry's fields, written straight into canonical form.
    pub(crate) fn decision_fields(&self, d: &Decision, approval_id: Option<&str>) -> Result<Fields, AuditError> {
        let mut f = Fields::new();
        f.str("kind", "decision").str("request_id", &self.request_id).str("via", self.arrival.as_str());
        self.caller.record(&mut f)?;
        self.action.record(&mut f)?;
        self.line.record(&mut f);
        self.body.record(&mut f);
        f.map("headers", &self.headers)?;
        f.str("decision", d.verdict.as_str());
        f.value("reasons", &json!(d.reasons))?;
        if let Some(id) = approval_id {
            f.str("approval_id", id);
        }
        f.opt_str("override_jti", self.settled.override_jti.as_deref());
        // Only when a trace is known (a caller's traceparent, or telemetry on).
        if let Some(t) = self.trace.trace_id() {
            f.str("trace_id", t);
        }
        Ok(f)
    }

    /// The access-log line's fields.
    pub(crate) fn access(&self, d: &Decision) -> body::Access {
        body::Access {
            request_id: self.request_id.clone(),
            agent: self.caller.agent.clone().unwrap_or_else(|| "-".into()),
            connector: self.action.connector.clone().unwrap_or_else(|| "-".into()),
            action: self.action.name.clone().unwrap_or_else(|| "-".into()),
            decision: d.verdict.as_str(),
            reasons: d.reasons.iter().map(|r| r.code.as_str()).collect::<Vec<_>>().join(","),
            started: self.started,
            trace: self.trace.clone(),
        }
    }

    /// SHA-256 of the canonical action (SPEC §6): what an override token is bound to.
    pub(crate) fn action_hash(&self) -> String {
        let (line, action) = (&self.line, &self.action);
        let body_sha256 = action
            .bound_body
            .clone()
            .or_else(|| self.body.hash.as_ref().map(|b| b.0.clone()))
            .unwrap_or_else(|| hex::encode(Sha256::digest(b"")));
        let v = json!({
            "agent": self.caller.agent, "connector": action.connector, "method": line.method.as_str(),
            "scheme": line.scheme.as_str(), "host": line.host, "port": line.port.to_string(),
            "path": line.path, "query": line.query, "body_sha256": body_sha256,
            "action": action.name, "params": action.params, "headers": self.settled.bound_headers,
        });
        let bytes = crate::audit::canonical_json(&v).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }
}

fn new_request_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}
