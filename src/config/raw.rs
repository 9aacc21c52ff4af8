//! Raw serde shapes of `gateway.yaml` and of a manifest, exactly as written by users.
//! Every struct denies unknown keys; nothing here is trusted until `model` validates it.

use serde::Deserialize;
use std::collections::BTreeMap;

// ---------------------------------------------------------------- gateway.yaml

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawGateway {
    pub listeners: RawListeners,
    pub policies: Option<String>,
    pub data_dir: Option<String>,
    pub keys: RawKeys,
    pub tls: RawTls,
    pub audit: RawAudit,
    pub identity: RawIdentity,
    pub admin: RawAdmin,
    pub limits: RawLimits,
    pub network: RawNetwork,
    pub log_format: Option<String>,
    pub telemetry: RawTelemetry,
    pub state: RawState,
    pub rate_limits: RawRateLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawListeners {
    pub proxy: Option<String>,
    pub transparent: Option<String>,
    pub admin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawKeys {
    pub gateway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub ca_cert: Option<String>,
    pub ca_key: Option<String>,
    pub extra_upstream_roots: Vec<String>,
    pub leaf_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAudit {
    pub path: Option<String>,
    pub origin: Option<String>,
    pub durability: Option<String>,
    pub sign_each_entry: Option<bool>,
    pub queue_capacity: Option<usize>,
}

/// `state:` (SPEC §15.1): where budgets, approvals and the log live.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawState {
    pub backend: Option<String>,
    pub postgres: RawPostgres,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPostgres {
    pub url_file: Option<String>,
    pub url: Option<String>,
    pub pool_size: Option<usize>,
    pub connect_timeout: Option<String>,
    pub statement_timeout: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawIdentity {
    pub default_agent: Option<String>,
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub keys: Vec<RawAdminKey>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdminKey {
    pub id: String,
    pub sha256: String,
    pub role: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub max_header_bytes: Option<usize>,
    pub max_body_bytes: Option<usize>,
    pub hash_before_forward: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub upstream_connect_timeout: Option<String>,
    pub upstream_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_in_flight_per_agent: Option<usize>,
    pub idle_timeout: Option<String>,
    pub tls_handshake_timeout: Option<String>,
    pub tunnel_idle_timeout: Option<String>,
    pub refusals_per_agent: Option<String>,
    pub refusals_burst: Option<u32>,
    /// How long an LLM response is read on after the agent went away, to learn its usage.
    pub usage_drain_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNetwork {
    pub allow_private_destinations: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTelemetry {
    pub otlp: RawOtlp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawOtlp {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub timeout: Option<String>,
    pub queue_size: Option<usize>,
}

/// `rate_limits` (SPEC §15.1): where rate-limit state lives.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRateLimits {
    pub backend: Option<String>,
    pub redis: Option<RawRedis>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRedis {
    pub url_file: Option<String>,
    pub url: Option<String>,
    pub timeout: Option<String>,
    pub ca_file: Option<String>,
}

// ---------------------------------------------------------------- manifest

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManifest {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub agent: RawAgent,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub capability: RawCapability,
    #[serde(default)]
    pub connectors: Vec<RawConnector>,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub escalation: RawEscalation,
    #[serde(default)]
    pub audit: RawManifestAudit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCapability {
    pub required: Option<bool>,
    pub audience: Option<String>,
    pub max_lifetime: Option<String>,
    pub leeway: Option<String>,
    pub issuers: Vec<RawIssuer>,
    pub revoked: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    pub id: String,
    #[serde(default)]
    pub public_key_file: Option<String>,
    #[serde(default)]
    pub public_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnector {
    pub name: String,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub tls: Option<String>,
    #[serde(default)]
    pub credentials: Vec<RawCredential>,
    #[serde(default)]
    pub strip_headers: Vec<String>,
    /// Which LLM API's token usage to read from responses (`openai` | `anthropic`).
    #[serde(default)]
    pub usage: Option<String>,
    /// Tokens reserved for a call whose request declares no output limit (with `usage`).
    #[serde(default)]
    pub usage_estimate: Option<u64>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// `http` (default) or `mcp`: JSON-RPC 2.0 over streamable HTTP at `mcp_path`.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub mcp_path: Option<String>,
    /// MCP `tools/call` rules, first match wins.
    #[serde(default)]
    pub tools: Vec<RawTool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTool {
    /// Exact tool name, or `*`.
    pub name: String,
    pub action: String,
    /// Params read from the call's `params.arguments` (`json` pointers) or fixed (`value`).
    #[serde(default)]
    pub params: BTreeMap<String, RawParam>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub header: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    #[serde(default)]
    pub methods: Vec<String>,
    pub path: String,
    pub action: String,
    #[serde(default)]
    pub params: BTreeMap<String, RawParam>,
    /// Marks a route whose bodies may be recorded in full (`audit.bodies: full`).
    #[serde(default)]
    pub safe: bool,
}

/// Where a route reads one param: exactly one source key is set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParam {
    /// JSON pointer into an `application/json` (or `*/*+json`) body.
    #[serde(default)]
    pub json: Option<String>,
    /// Key of an `application/x-www-form-urlencoded` body, as sent after percent-decoding.
    #[serde(default)]
    pub form: Option<String>,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// A fixed value (e.g. the currency of an API that has only one).
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub scale: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAllowDeny {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicy {
    pub connectors: RawAllowDeny,
    pub action_types: RawAllowDeny,
    pub amount_caps: BTreeMap<String, String>,
    pub approval: RawApproval,
    pub jurisdictions: RawAllowDeny,
    pub counterparties: RawAllowDeny,
    pub budgets: Vec<RawBudget>,
    pub rate_limits: Vec<RawRateLimit>,
    /// Constraints on declared params, by param name.
    pub params: BTreeMap<String, RawParamConstraint>,
}

/// `policy.params.<name>`: allow/deny lists of values and a decimal range.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawParamConstraint {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub min: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawApproval {
    pub action_types: Vec<String>,
    pub connectors: Vec<String>,
    pub amount_above: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub window: String,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub max_actions: Option<u64>,
    /// LLM tokens per window (recorded `usage.total_tokens`).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub escalate_at_percent: Option<u8>,
    #[serde(default)]
    pub max_spend: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    #[serde(default)]
    pub scope: Option<String>,
    pub rate: String,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawEscalation {
    pub mode: Option<String>,
    pub hold_timeout: Option<String>,
    pub approval_ttl: Option<String>,
    pub override_ttl: Option<String>,
    pub max_pending: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawManifestAudit {
    pub bodies: Option<String>,
    pub redact_headers: Option<Vec<String>>,
}
