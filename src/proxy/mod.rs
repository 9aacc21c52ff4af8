//! The data path, as a short sequence of stages (`pipeline`), each a function in its own module
//! that takes what the previous one proved and returns a typed value the next can trust — or a
//! `Stop`, answered and recorded in one place:
//!
//! `target` (where it goes) → `identify` (who, which manifest) → a small body read and hashed
//! (`RequestBody::hash_small`) → `classify` (connector, route, params) → `policy::evaluate` (the
//! pure engine) → `settle` (budget, escalation and override, rate limits) → `forward::commit`
//! (SSRF guard, durable `decision` entry) → `forward::send` (credentials, upstream, `outcome`
//! entry). The policy engine decides; this module only gathers facts, enforces and moves bytes.

mod agent_api;
mod body;
mod classify;
pub(crate) mod conn;
pub(crate) mod connect;
mod escalation;
mod facts;
pub(crate) use facts::Facts;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod hygiene;
mod identify;
mod mcp;
mod respond;
mod settle;
pub(crate) mod ssrf;
mod target;
pub mod tls;
pub mod transparent;
pub(crate) mod upstream;

pub(crate) use target::normalize_host;
pub use target::split_authority;

pub(crate) use crate::app::{App, Policies};
use crate::audit::AuditError;
use crate::limits::in_flight::InFlightSlot;
use crate::policy::{self, At, Code, Decision};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use respond::{DenyBody, deny_response};
use std::sync::Arc;
use std::time::{Duration, Instant};

use body::access_line;

pub(crate) use crate::response::{BoxError, ProxyBody, full_body, json_response};

/// A capability token the gateway presents for the pod, re-read when it changes on disk
/// (projected tokens rotate).
pub(crate) struct TokenFile {
    path: std::path::PathBuf,
    cached: std::sync::Mutex<(Option<String>, Instant)>,
}

impl TokenFile {
    pub(crate) fn new(path: std::path::PathBuf) -> TokenFile {
        let token = std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string());
        TokenFile { path, cached: std::sync::Mutex::new((token, crate::clock::instant())) }
    }
    fn get(&self) -> Option<String> {
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if crate::clock::since(c.1) > Duration::from_secs(10) {
            *c = (std::fs::read_to_string(&self.path).ok().map(|t| t.trim().to_string()), crate::clock::instant());
        }
        c.0.clone().filter(|t| !t.is_empty())
    }
}

/// How a request reached the gateway: recorded as its decision's `via`, and what the target
/// stage reads its destination from.
#[derive(Clone)]
pub(crate) enum Arrival {
    /// The proxy listener, origin-form: `http://127.0.0.1:15080/<connector>/...`.
    BaseUrl,
    /// The proxy listener as an explicit proxy: an absolute-form request, or CONNECT.
    Explicit,
    /// A request inside an intercepted TLS tunnel (after CONNECT, or caught transparently).
    Tunnel(Arc<connect::Tunnel>),
    /// A connection caught by the transparent listener; the address is its original destination.
    Transparent(std::net::SocketAddr),
}

impl Arrival {
    /// A request on the proxy listener: absolute-form and CONNECT are the explicit proxy.
    pub(crate) fn on_proxy_listener<B>(req: &Request<B>) -> Arrival {
        if req.uri().scheme().is_some() || req.method() == Method::CONNECT {
            Arrival::Explicit
        } else {
            Arrival::BaseUrl
        }
    }

    /// As recorded (`via`).
    fn as_str(&self) -> &'static str {
        match self {
            Arrival::BaseUrl => "base_url",
            Arrival::Explicit => "explicit",
            Arrival::Tunnel(_) => "tunnel",
            Arrival::Transparent(_) => "transparent",
        }
    }

    /// Whether the agent talks to the gateway as its explicit proxy (`Proxy-Authorization`, 407).
    fn is_explicit(&self) -> bool {
        matches!(self, Arrival::Explicit)
    }
}

/// A response the proxy produced itself (not the upstream's): the refusal of `d`, with the
/// status its code has `at`.
fn refuse(at: At, facts: &Facts, d: &Decision, record: Option<u64>, extra: DenyBody) -> Response<ProxyBody> {
    let status = d.code().status(at);
    match &facts.action.jsonrpc_id {
        Some(id) => respond::jsonrpc_refusal(id, d, record, facts.caller.agent.as_deref(), extra),
        None => deny_response(status, d, record, facts.caller.agent.as_deref(), extra),
    }
}

/// Whether a refusal is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// Not recorded: a request refused before it could be read or identified (malformed HTTP).
    Never,
    /// Recorded within the agent's refusal budget (`limits::refusals`).
    WithinBudget,
    /// Recorded outside the refusal budget: the refusals that end an approval wait, which
    /// `escalation.max_pending` and the approvers already bound.
    Always,
}

/// Why the path stops before forwarding.
pub(crate) enum Stop {
    /// Refused with the decision's §7 body and the status its code has `at`, recorded as
    /// `record` says.
    Refuse { decision: Decision, at: At, record: Record, headers: Option<Box<HeaderMap>> },
    /// A stage already answered, and recorded what it answered.
    Respond(Box<Response<ProxyBody>>),
}

impl Stop {
    /// A recorded refusal.
    pub(crate) fn refuse(decision: Decision) -> Stop {
        Stop::refuse_at(decision, At::Request)
    }
    /// A recorded refusal answered `at` (407 on the explicit proxy, 404, 405…).
    pub(crate) fn refuse_at(decision: Decision, at: At) -> Stop {
        Stop::Refuse { decision, at, record: Record::WithinBudget, headers: None }
    }
    /// A refusal that is not recorded.
    pub(crate) fn unrecorded(decision: Decision) -> Stop {
        Stop::unrecorded_at(decision, At::Request)
    }
    pub(crate) fn unrecorded_at(decision: Decision, at: At) -> Stop {
        Stop::Refuse { decision, at, record: Record::Never, headers: None }
    }
    /// A recorded refusal outside the refusal budget ([`Record::Always`]).
    pub(crate) fn refuse_always(decision: Decision) -> Stop {
        Stop::Refuse { decision, at: At::Request, record: Record::Always, headers: None }
    }
    pub(crate) fn respond(resp: Response<ProxyBody>) -> Stop {
        Stop::Respond(Box::new(resp))
    }
}

impl App {
    /// Records a decision entry; a failure to commit is answered 503 and nothing is forwarded.
    async fn record(&self, facts: &Facts, d: &Decision, approval_id: Option<&str>) -> Result<u64, Response<ProxyBody>> {
        let started = crate::clock::instant();
        let r = match facts.decision_fields(d, approval_id) {
            Ok(fields) => self.audit().append_fields(fields).await,
            Err(e) => Err(e),
        };
        self.metrics().audit_append.observe(crate::clock::since(started).as_secs_f64());
        r.map_err(|e| self.audit_failure(facts, e))
    }

    /// `record` for a decision committed only together with `guard`'s change; `Err(Err(why))`
    /// when the guard refused (nothing was appended).
    async fn record_guarded(
        &self,
        facts: &Facts,
        d: &Decision,
        approval_id: Option<&str>,
        guard: crate::audit::Precondition,
    ) -> Result<u64, Result<Response<ProxyBody>, String>> {
        let started = crate::clock::instant();
        let r = match facts.decision_fields(d, approval_id) {
            Ok(fields) => self.audit().append_guarded(fields, guard).await,
            Err(e) => Err(e),
        };
        self.metrics().audit_append.observe(crate::clock::since(started).as_secs_f64());
        r.map_err(|e| match e {
            AuditError::Refused(why) => Err(why),
            e => Ok(self.audit_failure(facts, e)),
        })
    }

    pub(crate) fn audit_failure(&self, facts: &Facts, e: AuditError) -> Response<ProxyBody> {
        let msg = match e {
            AuditError::QueueFull => "the audit queue is full; nothing was forwarded",
            _ => "the audit log cannot commit; nothing was forwarded",
        };
        tracing::error!(request_id = %facts.request_id, error = %e, "audit append failed");
        let d = Decision::deny(Code::AuditUnavailable, msg);
        let status = d.code().status(At::Request);
        facts.access(&d).finish_span(status, None, None);
        deny_response(status, &d, None, facts.caller.agent.as_deref(), DenyBody::default())
    }

    /// Answers a stopped request: recorded refusals through `refuse_recorded`, with any extra
    /// headers (429's `Retry-After`…) on the refusal itself.
    async fn answer(&self, facts: &Facts, stop: Stop) -> Response<ProxyBody> {
        match stop {
            Stop::Respond(resp) => *resp,
            Stop::Refuse { decision, at, record: Record::Never, .. } => {
                refuse(at, facts, &decision, None, DenyBody::default())
            }
            Stop::Refuse { decision, at, record: Record::Always, .. } => {
                self.refuse_recorded_always(at, facts, decision).await
            }
            Stop::Refuse { decision, at, record: Record::WithinBudget, headers } => {
                let mut resp = self.refuse_recorded(at, facts, decision).await;
                // Only on the refusal itself, not on a 503 that replaced it.
                if let Some(h) = headers
                    && resp.headers().get("x-uapk-record").is_some()
                {
                    resp.headers_mut().extend(*h);
                }
                resp
            }
        }
    }

    /// Beyond the agent's refusal budget (`limits::refusals`) a refusal is not recorded as its
    /// own entry but counted into the agent's summary entry (under its code, method, host,
    /// connector and action, with its path, query and params if it is the first), and answered 429
    /// `refusals_rate_limited` with `Retry-After` and the request id to find it there — after a
    /// pause (the time until the budget has room again, 100 ms to 1 s), so a flooding client
    /// slows down instead of taking the core from every other agent (a timer, no CPU).
    async fn over_refusal_budget(&self, facts: &Facts, d: &Decision) -> Option<Response<ProxyBody>> {
        use crate::limits::refusals::{Admission, Refusal, Refuser};
        let refuser = match (&facts.caller.agent, &facts.arrival) {
            (Some(a), _) => Refuser::Agent(a.clone()),
            (None, Arrival::Transparent(_)) => Refuser::Listener("transparent"),
            (None, _) => Refuser::Listener("proxy"),
        };
        let refusal = Refusal {
            request_id: &facts.request_id,
            code: d.code().as_str(),
            method: facts.line.method.as_str(),
            host: &facts.line.host,
            connector: facts.action.connector.as_deref(),
            action: facts.action.name.as_deref(),
            path: &facts.line.path,
            query: facts.line.query.as_deref(),
            params: &facts.action.params,
        };
        let Admission::Summarised { retry_after } = self.refusals().admit(&refuser, &refusal, crate::clock::instant())
        else {
            return None;
        };
        let why = Decision::deny(
            Code::RefusalsRateLimited,
            format!("{} refused; refusals beyond limits.refusals_per_agent are summarised", d.code()),
        );
        tokio::time::sleep(retry_after.clamp(Duration::from_millis(100), Duration::from_secs(1))).await;
        let mut resp = refuse(At::Request, facts, &why, None, DenyBody::default());
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs()));
        if let Ok(v) = HeaderValue::from_str(&facts.request_id) {
            resp.headers_mut().insert("x-uapk-request-id", v);
        }
        // Counted, but no access line per refusal: the summary entry is the record.
        self.count(facts, &why);
        facts.access(&why).finish_span(why.code().status(At::Request), None, None);
        Some(resp)
    }

    /// An identified agent with `limits.max_in_flight_per_agent` requests in flight: 429
    /// `too_many_requests_in_flight`, recorded (within the refusal budget, like any refusal), and
    /// the connection closed, so the agent's extra connections give their place back.
    async fn too_many_in_flight(&self, facts: &Facts) -> Response<ProxyBody> {
        let d = Decision::deny(
            Code::TooManyRequestsInFlight,
            format!(
                "the agent already has {} requests in flight (limits.max_in_flight_per_agent)",
                self.in_flight().max()
            ),
        );
        let mut resp = self.refuse_recorded(At::Request, facts, d).await;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.entry(header::RETRY_AFTER).or_insert(HeaderValue::from_static("1"));
        resp
    }

    /// Records `d` and answers with its code's status `at` (within the agent's refusal budget).
    async fn refuse_recorded(&self, at: At, facts: &Facts, d: Decision) -> Response<ProxyBody> {
        if let Some(resp) = self.over_refusal_budget(facts, &d).await {
            return resp;
        }
        self.refuse_recorded_always(at, facts, d).await
    }

    /// Records `d` and answers with its code's status `at`, outside the refusal budget: for the
    /// refusals that end an approval wait, which `escalation.max_pending` and the approvers
    /// already bound.
    async fn refuse_recorded_always(&self, at: At, facts: &Facts, d: Decision) -> Response<ProxyBody> {
        let status = d.code().status(at);
        match self.record(facts, &d, None).await {
            Ok(idx) => {
                let mut resp = refuse(at, facts, &d, Some(idx), DenyBody::default());
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
        self.count(facts, d);
        access_line(&facts.access(d), status, 0, record, None, None);
    }

    /// Counts a decided request in `uapk_requests_total`. The `agent` and `connector` labels
    /// are configured names only — `unknown` for a name no manifest configures (a default agent
    /// without a manifest, a connector named by a refused request's path), `-` / `none` before
    /// one is known — never a string an agent chose, so the series stay bounded.
    pub(crate) fn count(&self, facts: &Facts, d: &Decision) {
        let policies = self.policies().load();
        let manifest = facts.caller.agent.as_deref().and_then(|a| policies.set.get(a));
        let agent = match (facts.caller.agent.as_deref(), manifest) {
            (None, _) => "-",
            (Some(a), Some(_)) => a,
            (Some(_), None) => "unknown",
        };
        let connector = facts.action.connector.as_deref().map(|c| {
            let configured = match manifest {
                Some(m) => m.connector(c).is_some(),
                // A refusal before the agent is known: any manifest's connector.
                None => policies.set.manifests.values().any(|m| m.connector(c).is_some()),
            };
            if configured { c } else { "unknown" }
        });
        self.metrics().request(d.verdict.as_str(), d.code().as_str(), agent, connector, facts.caller.mode.as_str());
    }
}

/// The first path segment of the proxy listener that is the gateway's own (`/uapk/v1/...`),
/// never a connector.
pub(crate) const AGENT_API: &str = "uapk";

/// The whole request path.
pub(crate) async fn handle(gw: Arc<App>, req: Request<Incoming>, arrival: Arrival) -> Response<ProxyBody> {
    let started = crate::clock::instant();
    let resp = if req.method() == Method::CONNECT && arrival.is_explicit() {
        connect::open(&gw, req).await
    } else {
        handle_inner(&gw, req, arrival).await
    };
    gw.metrics().request_duration.observe(crate::clock::since(started).as_secs_f64());
    resp
}

async fn handle_inner(gw: &Arc<App>, req: Request<Incoming>, arrival: Arrival) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let mut facts = Facts::new(&parts.method, &parts.uri, arrival.clone());
    facts.trace = gw.telemetry().start_request(&parts.headers, parts.method.as_str());
    match pipeline(gw, parts, body, &arrival, &mut facts).await {
        Ok(resp) => resp,
        Err(stop) => gw.answer(&facts, stop).await,
    }
}

/// The request path, a stage a line.
async fn pipeline(
    gw: &Arc<App>,
    parts: http::request::Parts,
    body: Incoming,
    arrival: &Arrival,
    facts: &mut Facts,
) -> Result<Response<ProxyBody>, Stop> {
    let policies = gw.policies().load_full();
    let target = target::parse(&parts, arrival, facts)?;
    let who = identify::identify(gw, &policies, &parts.headers, facts, target.preset_token.clone())
        .map_err(|d| identify::refusal(facts, &target, d))?;
    facts.headers = hygiene::recorded_headers(&parts.headers, &who.manifest.audit.redact_headers);
    facts.body.mode = who.manifest.audit.bodies;
    let Some(slot) = gw.in_flight().try_take(&who.manifest.agent.id) else {
        return Ok(gw.too_many_in_flight(facts).await);
    };
    if target.is_agent_api() {
        // Answered here, while the agent's in-flight slot is still held.
        let resp = match agent_api::serve(gw, facts, &parts.method, &target.path).await {
            Ok(resp) => resp,
            Err(stop) => gw.answer(facts, stop).await,
        };
        return Ok(holding(resp, slot));
    }
    if let Some(why) = hygiene::upgrade_refusal(&parts.method, &parts.headers) {
        return Err(Stop::refuse(Decision::deny(Code::UpgradeNotAllowed, why)));
    }
    let mut body = classify::RequestBody::Streaming(body);
    body.hash_small(&parts.headers, &gw.config().limits, facts).await?;
    let action = classify::classify(gw, &who, &target, &parts, &mut body, facts).await?;
    let decision = policy::evaluate(&who.manifest, who.claims.as_deref(), &action.policy_action());
    let settled = settle::settle(gw, &who, &action, decision, &parts, &mut body, facts).await?;
    let recorded = forward::commit(gw, facts, settled).await?;
    Ok(holding(forward::send(gw, facts, &action.connector, parts, body.into_proxy(), recorded).await, slot))
}

/// The response, whose body keeps the agent's in-flight slot until it ends or is dropped.
fn holding(resp: Response<ProxyBody>, slot: InFlightSlot) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    resp.map(|b| HoldsSlot { inner: b, _slot: slot }.boxed_unsync())
}

/// A response body holding an in-flight slot (`limits::in_flight`).
struct HoldsSlot {
    inner: ProxyBody,
    _slot: InFlightSlot,
}

impl http_body::Body for HoldsSlot {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::TokenFile;
    use std::time::Duration;

    #[test]
    fn a_rotated_token_file_is_read_again_after_ten_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let file = TokenFile::new(path.clone());
        std::fs::write(&path, "second").unwrap();
        assert_eq!(file.get().as_deref(), Some("first"), "cached for ten seconds");
        crate::clock::advance(Duration::from_secs(11));
        assert_eq!(file.get().as_deref(), Some("second"), "re-read once the cache is older than ten seconds");
        std::fs::write(&path, "").unwrap();
        crate::clock::advance(Duration::from_secs(11));
        assert_eq!(file.get(), None, "an empty file presents no token");
    }
}
