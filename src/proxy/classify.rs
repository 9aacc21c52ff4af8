//! Stage 3, classification: which connector the request belongs to (by the base-URL name or by
//! host and port — the same rule a CONNECT is authorised by), whether the agent may use it, and
//! which route it takes, with the params the policy reads, read as the upstream will read them.

use super::identify::Identity;
use super::target::{Target, sanitize};
use super::{Facts, Stop, full_body};
use crate::clock::now_unix;
use crate::config::{BodiesMode, Connector, Manifest, Scheme};
use crate::limits::Spend;
use crate::policy::{self, Code, Decision, Params};
use crate::response::{BoxError, ProxyBody};
use bytes::Bytes;
use http::{HeaderMap, header, request::Parts};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// What a request was classified by.
pub(super) enum Rule {
    /// A REST route of the connector (its index).
    Route(usize),
    /// An MCP connector's tool rule (its index), for `tools/call`.
    Tool(usize),
    /// An MCP protocol message: `mcp.session` or `mcp.<method>`.
    Protocol(String),
}

/// A request classified: its connector, the rule it falls under, and its params.
pub(crate) struct Classified {
    pub connector: Arc<Connector>,
    rule: Rule,
    pub params: Params,
}

impl Classified {
    /// The action type.
    pub(super) fn action(&self) -> &str {
        match &self.rule {
            Rule::Route(i) => &self.connector.routes[*i].action,
            Rule::Tool(i) => self.connector.mcp.as_ref().map_or("", |m| m.tools[*i].rule.action.as_str()),
            Rule::Protocol(a) => a,
        }
    }

    /// What the policy engine reads.
    pub(super) fn policy_action(&self) -> policy::Action<'_> {
        policy::Action { connector: &self.connector, action: self.action(), params: &self.params }
    }

    /// What a forwarded request of this action counts in budgets.
    pub(super) fn spend(&self, manifest: &Manifest) -> Spend {
        Spend {
            agent: manifest.agent.id.clone(),
            connector: self.connector.name.clone(),
            action: self.action().to_string(),
            amount: self.params.amount.map(|a| (a, self.params.currency.clone().unwrap_or_default())),
            at: now_unix(),
        }
    }
}

/// The request body: streamed to the upstream unless a stage needs it whole (body params, or
/// the hash an escalation binds).
pub(crate) enum RequestBody {
    Streaming(Incoming),
    Buffered(Bytes),
    /// Failed to read: nothing is forwarded.
    Gone,
}

impl RequestBody {
    /// Reads the whole body (once) and records its hash and length in `facts`; a refusal for a
    /// body too large, too slow or broken.
    pub(super) async fn buffer(
        &mut self,
        headers: &HeaderMap,
        limits: &crate::config::Limits,
        facts: &mut Facts,
    ) -> Result<&Bytes, Stop> {
        let keep_full = facts.body.mode == BodiesMode::Full;
        self.read(headers, limits, facts, keep_full).await
    }

    /// SPEC §16.3: a body whose declared length is at most `limits.hash_before_forward` is read
    /// and hashed now, before anything is decided, so its hash is in the `decision` entry even
    /// if the process dies right after forwarding it. Longer and chunked bodies stream (hashed on
    /// the way, for the `outcome` entry); `audit.bodies: none` records no hash, so reads nothing.
    /// (With `audit.bodies: full` the text is kept only once the route is known to be `safe`:
    /// [`RequestBody::keep_full`].)
    pub(super) async fn hash_small(
        &mut self,
        headers: &HeaderMap,
        limits: &crate::config::Limits,
        facts: &mut Facts,
    ) -> Result<(), Stop> {
        let RequestBody::Streaming(incoming) = self else { return Ok(()) };
        // hyper knows the length exactly only from a single valid Content-Length (HTTP/1 and 2).
        let small = incoming.size_hint().exact().is_some_and(|n| n > 0 && n <= limits.hash_before_forward as u64);
        if !small || facts.body.mode == BodiesMode::None {
            return Ok(());
        }
        self.read(headers, limits, facts, false).await.map(|_| ())
    }

    /// With `audit.bodies: full` still in force for this request (a `safe` route, an MCP
    /// endpoint), the text of a body read earlier is recorded with the decision.
    pub(super) fn keep_full(&self, facts: &mut Facts) {
        if facts.body.mode == BodiesMode::Full && facts.body.full.is_none() {
            facts.body.full = self.buffered().cloned();
        }
    }

    /// Whether the request carries a body: a length above 0, chunked, or HTTP/2 data to come.
    pub(super) fn carries_body(&self, headers: &HeaderMap) -> bool {
        let streamed = match self {
            RequestBody::Streaming(b) => !b.is_end_stream(),
            RequestBody::Buffered(b) => !b.is_empty(),
            RequestBody::Gone => false,
        };
        streamed || headers.contains_key(header::TRANSFER_ENCODING)
    }

    async fn read(
        &mut self,
        headers: &HeaderMap,
        limits: &crate::config::Limits,
        facts: &mut Facts,
        keep_full: bool,
    ) -> Result<&Bytes, Stop> {
        if let RequestBody::Streaming(_) = self {
            let RequestBody::Streaming(incoming) = std::mem::replace(self, RequestBody::Gone) else {
                unreachable!("matched above")
            };
            let b = read_whole(incoming, headers, limits)
                .await
                .map_err(|code| Stop::refuse(body_refusal(code, limits.max_body_bytes)))?;
            facts.body.hash = Some((hex::encode(Sha256::digest(&b)), b.len() as u64));
            if keep_full {
                facts.body.full = Some(b.clone());
            }
            *self = RequestBody::Buffered(b);
        }
        match self {
            RequestBody::Buffered(b) => Ok(b),
            _ => Err(Stop::refuse(Decision::deny(Code::MalformedRequest, "the request body could not be read"))),
        }
    }

    pub(super) fn buffered(&self) -> Option<&Bytes> {
        match self {
            RequestBody::Buffered(b) => Some(b),
            _ => None,
        }
    }

    pub(super) fn into_proxy(self) -> ProxyBody {
        match self {
            RequestBody::Streaming(b) => b.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
            RequestBody::Buffered(b) => full_body(b),
            RequestBody::Gone => full_body(Bytes::new()),
        }
    }
}

/// The connector a request belongs to: the one its base-URL path names, else the one whose
/// hosts and ports name its target (`facts.{host,port}`), as for a CONNECT. For a base-URL
/// request the target becomes the connector's base URL.
pub(crate) fn connector_for(
    manifest: &Manifest,
    base: Option<&str>,
    path: &str,
    facts: &mut Facts,
) -> Result<Arc<Connector>, Decision> {
    let Some(name) = base else {
        return manifest
            .connectors
            .iter()
            .find(|c| c.matches_host(&facts.line.host) && c.matches_port(facts.line.port))
            .cloned()
            .ok_or_else(|| {
                Decision::deny(
                    Code::HostNotAllowed,
                    format!("{}:{} belongs to no connector of this agent", sanitize(&facts.line.host), facts.line.port),
                )
            });
    };
    let c = manifest.connector(name).ok_or_else(|| {
        facts.action.connector = Some(sanitize(name));
        Decision::deny(Code::ToolNotAllowed, format!("no connector named {}", sanitize(name)))
    })?;
    let Some(b) = c.base_url.as_ref() else {
        facts.action.connector = Some(name.to_string());
        return Err(Decision::deny(Code::ToolNotAllowed, format!("connector {name} has no base_url")));
    };
    facts.line.aim(b.scheme, b.host.clone(), b.port);
    facts.line.path = format!("{}{}", b.path_prefix, path);
    Ok(c.clone())
}

/// May this agent use this connector, this way: the manifest's and token's connector lists, a
/// connector whose credentials are missing, and no credentials over cleartext.
pub(crate) fn admit(who: &Identity, connector: &Connector, facts: &Facts) -> Result<(), Decision> {
    policy::check_connector(&who.manifest, who.claims.as_deref(), connector)?;
    match cleartext_refusal(facts, connector) {
        Some(d) => Err(d),
        None => Ok(()),
    }
}

/// Connector, route (or MCP tool), body (when the route reads it) and params.
pub(crate) async fn classify(
    gw: &super::App,
    who: &Identity,
    target: &Target,
    parts: &Parts,
    body: &mut RequestBody,
    facts: &mut Facts,
) -> Result<Classified, Stop> {
    let connector =
        connector_for(&who.manifest, target.base_connector.as_deref(), &target.path, facts).map_err(Stop::refuse)?;
    facts.action.connector = Some(connector.name.clone());
    admit(who, &connector, facts).map_err(Stop::refuse)?;
    if let Some(mcp) = &connector.mcp {
        body.keep_full(facts);
        let (rule, params) = super::mcp::classify(gw, mcp, parts, body, facts).await?;
        facts.action.params = params.values.clone();
        return Ok(Classified { connector, rule, params });
    }

    let Some((route, captures)) = connector.route(&facts.line.method, &facts.line.path) else {
        let d = Decision::deny(
            Code::RouteNotAllowed,
            format!("{} {} matches no route", facts.line.method, sanitize(&facts.line.path)),
        );
        return Err(Stop::refuse(d));
    };
    facts.action.route = Some(route.path.raw.clone());
    facts.action.name = Some(route.action.clone());
    if facts.body.mode == BodiesMode::Full && !route.safe {
        // `audit.bodies: full` records bodies only of routes marked `safe`; others are hashed.
        facts.body.mode = BodiesMode::Hash;
    }
    body.keep_full(facts);
    let index = connector.routes.iter().position(|r| std::ptr::eq(r, route)).unwrap_or_default();

    // A route that reads body params reads them only from its declared media type, as the
    // upstream decides by Content-Type: anything else is refused, never guessed at.
    if route.needs_body() {
        let b = body.buffer(&parts.headers, &gw.config().limits, facts).await?;
        policy::check_body_media_type(route, &parts.headers, b).map_err(Stop::refuse)?;
    }
    let params = policy::extract_params(
        route,
        &captures,
        &parts.headers,
        facts.line.query.as_deref(),
        body.buffered().map(|b| &b[..]),
    );
    facts.action.params = params.values.clone();
    Ok(Classified { connector: connector.clone(), rule: Rule::Route(index), params })
}

/// Credentials never travel in cleartext (SPEC §14.2): a plain-HTTP request (absolute-form or
/// transparent) to a connector whose `base_url` is `https://`, or that injects credentials and
/// has no `base_url` to say plain HTTP is intended, is refused before anything is dialled.
fn cleartext_refusal(facts: &Facts, connector: &Connector) -> Option<Decision> {
    if facts.line.scheme != Scheme::Http {
        return None;
    }
    let refused = match &connector.base_url {
        Some(b) => b.scheme == Scheme::Https,
        None => connector.injects_credentials(),
    };
    refused.then(|| {
        Decision::deny(
            Code::CleartextNotAllowed,
            format!("connector {} is reached only over TLS; use https:// (CONNECT) or its base URL", connector.name),
        )
    })
}

pub(crate) fn body_refusal(code: Code, limit: usize) -> Decision {
    match code {
        Code::BodyTooLarge => {
            Decision::deny(code, format!("the request body exceeds limits.max_body_bytes ({limit} bytes)"))
        }
        Code::BodyTimeout => Decision::deny(code, "the request body did not arrive within limits.body_read_timeout"),
        _ => Decision::deny(Code::MalformedRequest, "the request body could not be read"),
    }
}

/// Reads a whole body up to `limits.max_body_bytes`: `body_too_large` above it, `body_timeout`
/// when it stalls, `malformed_request` if the peer fails mid-body.
async fn read_whole(body: Incoming, headers: &HeaderMap, limits: &crate::config::Limits) -> Result<Bytes, Code> {
    let limit = limits.max_body_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Code::BodyTooLarge);
    }
    match tokio::time::timeout(limits.body_read_timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(Code::BodyTimeout),
        Ok(r) => match r {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Code::BodyTooLarge),
            Err(_) => Err(Code::MalformedRequest),
        },
    }
}
