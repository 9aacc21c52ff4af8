//! Stages 6 and 7: the decision is recorded durably before anything leaves (with the approval
//! it goes out under consumed in the same commit), then the request is forwarded with the
//! connector's credentials and the answer streamed back; its `outcome` entry is written when the
//! response body ends.

use super::body::{self, HashedBody, RecordedBody, RequestDigest, StallCut, Stalled};
use super::respond::DenyBody;
use super::settle::{self, Grant, Settled};
use super::{App, BoxError, Facts, ProxyBody, Stop, conn, full_body, hygiene, refuse};
use crate::approvals::{self, approval_entry};
use crate::config::{BodiesMode, Connector, Scheme};
use crate::limits::{Settlement, TokenUse};
use crate::policy::{At, Code, Decision, Verdict};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;

/// The SSRF guard for requests about to leave (resolved once, every address classified; the
/// client dials only what was vetted), then the durable `decision` entry, then the budget and
/// rate reservations are kept. Returns the record index and the decision. The budget
/// reservation is settled on every path: released when the request stops here, kept (and its
/// token estimate held until the outcome) once the decision is recorded.
pub(crate) async fn commit(gw: &App, facts: &mut Facts, settled: Settled<'_>) -> Result<(u64, Decision), Stop> {
    let Settled { decision, dry_run, budget, rate, grant } = settled;
    // One rule with the rebuild from the log (a dry-run escalation is forwarded, not counted as
    // an action). A shared store keeps the reservation in the decision's own commit.
    let counted = crate::limits::counts_toward_budgets(decision.verdict.as_str(), facts.action.route.as_deref());
    let keep = budget.as_ref().filter(|r| r.shared()).map(|r| (r.id().to_string(), counted));
    match record_decision(gw, facts, &decision, dry_run, grant.as_ref(), keep).await {
        Ok(idx) => {
            if let Some(r) = budget {
                gw.budgets().settle(r.id(), Settlement::Forwarded { counted }).await;
            }
            if let Some(t) = rate {
                t.commit();
            }
            if let Some(g) = &grant {
                let e = approval_entry(
                    &g.approval_id,
                    "consumed",
                    approvals::BY_GATEWAY,
                    facts.caller.agent.as_deref(),
                    &[("request_id", json!(facts.request_id)), ("record", json!(idx.to_string()))],
                );
                let _ = gw.audit().append_nowait(e);
            }
            Ok((idx, decision))
        }
        Err(stop) => {
            // Refused by the SSRF guard, the audit log or a used override: nothing is forwarded.
            settle::release(gw, budget).await;
            if let Some(t) = rate {
                t.release().await;
            }
            Err(stop)
        }
    }
}

/// The SSRF guard, then the durable `decision` entry (consuming the approval it goes out under
/// in the same commit).
async fn record_decision(
    gw: &App,
    facts: &mut Facts,
    decision: &Decision,
    dry_run: bool,
    grant: Option<&Grant>,
    keep_budget: Option<(String, bool)>,
) -> Result<u64, Stop> {
    if (decision.verdict == Verdict::Allow || dry_run)
        && let Some(d) = gw.vetter().vet(&facts.line.host, facts.line.port).await.refusal()
    {
        return Err(Stop::refuse(d));
    }
    let idx = match grant {
        None if keep_budget.is_none() => gw.record(facts, decision, None).await.map_err(Stop::respond)?,
        None => {
            let guard = crate::audit::Precondition { consume_approval: None, keep_budget };
            match gw.record_guarded(facts, decision, None, guard).await {
                Ok(i) => i,
                Err(Err(why)) => {
                    tracing::error!(request_id = %facts.request_id, why = %why, "budget reservation not kept");
                    return Err(Stop::respond(gw.audit_failure(facts, crate::audit::AuditError::Refused(why))));
                }
                Err(Ok(resp)) => return Err(Stop::respond(resp)),
            }
        }
        Some(g) => {
            facts.settled.override_jti = g.jti.clone();
            let guard = crate::audit::Precondition {
                consume_approval: Some((g.approval_id.clone(), crate::clock::now_unix())),
                keep_budget,
            };
            match gw.record_guarded(facts, decision, Some(&g.approval_id), guard).await {
                Ok(i) => i,
                Err(Err(code)) => {
                    facts.settled.override_jti = None;
                    let d = if code == Code::OverrideTokenAlreadyUsed.as_str() {
                        Decision::deny(Code::OverrideTokenAlreadyUsed, "the approval was already used")
                    } else {
                        Decision::deny(
                            Code::OverrideTokenInvalid,
                            "the approval behind the override token is not approved",
                        )
                    };
                    return Err(Stop::refuse(d));
                }
                Err(Ok(resp)) => return Err(Stop::respond(resp)),
            }
        }
    };
    Ok(idx)
}

/// Forwards a recorded request and counts it; a dry-run request that would have been refused
/// says so in `x-uapk-would-deny`.
pub(crate) async fn send(
    gw: &Arc<App>,
    facts: &Facts,
    connector: &Connector,
    parts: http::request::Parts,
    body: ProxyBody,
    (record, decision): (u64, Decision),
) -> Response<ProxyBody> {
    let would_deny = (facts.caller.mode == crate::config::PolicyMode::DryRun && decision.verdict != Verdict::Allow)
        .then(|| decision.code());
    let mut resp = forward(gw, facts, connector, parts, body, record, facts.access(&decision)).await;
    if let Some(code) = would_deny {
        resp.headers_mut().insert("x-uapk-would-deny", HeaderValue::from_static(code.as_str()));
    }
    gw.count(facts, &decision);
    resp
}

/// Sends the request upstream with the connector's credentials and streams the answer back;
/// the `outcome` entry is written when the response body ends.
async fn forward(
    gw: &Arc<App>,
    facts: &Facts,
    connector: &Connector,
    parts: http::request::Parts,
    body: ProxyBody,
    record: u64,
    access: body::Access,
) -> Response<ProxyBody> {
    let host = if facts.line.host.contains(':') { format!("[{}]", facts.line.host) } else { facts.line.host.clone() };
    let default_port = matches!((facts.line.scheme, facts.line.port), (Scheme::Http, 80) | (Scheme::Https, 443));
    let authority = if default_port { host } else { format!("{host}:{}", facts.line.port) };
    let pq = match &facts.line.query {
        Some(q) => format!("{}?{q}", facts.line.path),
        None => facts.line.path.clone(),
    };
    let uri = match format!("{}://{authority}{pq}", facts.line.scheme.as_str()).parse::<http::Uri>() {
        Ok(u) => u,
        Err(_) => {
            unsent(gw, facts);
            let d = Decision::deny(Code::MalformedRequest, "the upstream URI is invalid");
            return refuse(At::Request, facts, &d, Some(record), DenyBody::default());
        }
    };
    let mut parts = parts;
    // An upgrade (WebSocket) keeps its Upgrade/Connection pair; the tunnel is spliced after 101.
    let upgrade = hygiene::requested_upgrade(&parts.headers);
    let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    // The spliced connection keeps its place under limits.max_connections until it closes.
    let (slot, splice_idle) =
        (parts.extensions.get::<conn::ConnSlot>().cloned(), gw.config().limits.tunnel_idle_timeout);
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
    let (body, body_stalled) = cut_stalls(facts, body, gw.config().limits.body_read_timeout);
    // With telemetry on, the upstream continues the gateway's trace (its call's span).
    let span = facts.trace.start_upstream(&mut headers);
    let (body, request_body) = hash_streamed(facts, body);
    let mut up = Request::builder().method(parts.method).uri(uri).version(http::Version::HTTP_11);
    if let Some(h) = up.headers_mut() {
        *h = headers;
    }
    let up = match up.body(body) {
        Ok(r) => r,
        Err(_) => {
            unsent(gw, facts);
            let d = Decision::deny(Code::MalformedRequest, "the request cannot be forwarded");
            return refuse(At::Request, facts, &d, Some(record), DenyBody::default());
        }
    };
    let outcome = body::Outcome {
        audit: gw.audit().clone(),
        request_id: facts.request_id.clone(),
        record,
        upstream_latency: std::time::Duration::ZERO,
        access,
        request_body,
        usage: body::UsageHook::new(
            connector.usage,
            gw.budgets(),
            facts.settled.token_estimate.unwrap_or(connector.usage_estimate),
            gw.config().limits.usage_drain_timeout,
        ),
        body_stalled: body_stalled.clone(),
    };
    // The exchange runs in a task of its own, so an agent that goes away while the upstream
    // thinks does not cancel it: the request was sent, and its outcome (and an LLM call's
    // usage) is still recorded.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (client, timeout, gw2) = (gw.client().clone(), gw.config().limits.upstream_timeout, gw.clone());
    tokio::spawn(async move {
        let mut outcome = outcome;
        let sent = crate::clock::instant();
        let result = tokio::time::timeout(timeout, client.request(up)).await;
        outcome.upstream_latency = crate::clock::since(sent);
        gw2.metrics().upstream_duration.observe(outcome.upstream_latency.as_secs_f64());
        let (status, error) = match &result {
            Ok(Ok(r)) => (r.status(), None),
            Ok(Err(e)) => {
                let (at, msg) = upstream_error(e);
                (Code::UpstreamUnavailable.status(at), Some(msg))
            }
            Err(_) => (Code::UpstreamTimeout.status(At::Request), Some(UPSTREAM_TIMEOUT)),
        };
        outcome.access.finish_upstream(span, status, record, error);
        if let Err((result, outcome)) = tx.send((result, outcome)) {
            abandoned(result, outcome);
        }
    });
    let Ok((result, outcome)) = rx.await else {
        // The exchange's task failed: the request may have been sent, so an LLM call is charged
        // its estimate.
        if let Some(estimate) = facts.settled.token_estimate {
            gw.budgets().settle_later(&facts.request_id, Settlement::Tokens(token_use(facts, estimate)));
        }
        let d = Decision::deny(Code::UpstreamUnavailable, "the upstream exchange failed");
        return refuse(At::Request, facts, &d, Some(record), DenyBody::default());
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
            let msg = "the upstream switched to a protocol that was not allowed";
            let d = Decision::deny(Code::UpstreamUnavailable, msg);
            outcome.write(d.code().status(At::Request), 0, None, Some(msg));
            refuse(At::Request, facts, &d, Some(record), DenyBody::default())
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
                let r = conn::splice(&mut c, &mut u, splice_idle).await;
                drop(slot);
                outcome.write(StatusCode::SWITCHING_PROTOCOLS, r.a_to_b + r.b_to_a, None, r.error);
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
        Ok(Err(_)) if body_stalled.as_ref().is_some_and(Stalled::get) => {
            // The agent stopped sending: the upstream request was aborted mid-body.
            let msg = "the request body stalled longer than limits.body_read_timeout; the upstream request was aborted";
            let d = Decision::deny(Code::BodyTimeout, msg);
            outcome.write(d.code().status(At::Request), 0, None, Some(msg));
            let mut resp = refuse(At::Request, facts, &d, Some(record), DenyBody::default());
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        Ok(Err(e)) => {
            let (at, msg) = upstream_error(&e);
            let d = Decision::deny(Code::UpstreamUnavailable, msg);
            // A request that never reached the upstream is charged nothing; one that failed
            // after it was sent is charged its estimate.
            let usage = if e.is_connect() { body::UsageRead::Unsent } else { body::UsageRead::NoBody };
            outcome.write_with_usage(d.code().status(at), 0, None, Some(msg), usage);
            refuse(at, facts, &d, Some(record), DenyBody::default())
        }
        Err(_) => {
            let d = Decision::deny(Code::UpstreamTimeout, UPSTREAM_TIMEOUT);
            outcome.write(d.code().status(At::Request), 0, None, Some(UPSTREAM_TIMEOUT));
            refuse(At::Request, facts, &d, Some(record), DenyBody::default())
        }
    }
}

/// A streamed request body (not buffered, not known empty) is cut when it sends nothing for
/// `limits.body_read_timeout` (SPEC §16.3), as a buffered one is refused.
fn cut_stalls(facts: &Facts, body: ProxyBody, timeout: std::time::Duration) -> (ProxyBody, Option<Stalled>) {
    if facts.body.hash.is_some() || http_body::Body::is_end_stream(&body) {
        return (body, None);
    }
    let stalled = Stalled::default();
    (StallCut::new(body, timeout, stalled.clone()).boxed_unsync(), Some(stalled))
}

type Exchange = Result<Result<Response<Incoming>, hyper_util::client::legacy::Error>, tokio::time::error::Elapsed>;

/// The agent went away before the upstream answered: the outcome is recorded all the same (an
/// LLM response's body read on for its usage, `RecordedBody`'s drop).
fn abandoned(result: Exchange, outcome: body::Outcome) {
    const GONE: &str = "the client went away before the upstream answered";
    match result {
        Ok(Ok(resp)) if resp.status() != StatusCode::SWITCHING_PROTOCOLS => {
            let (rp, rb) = resp.into_parts();
            drop(RecordedBody::new(rb.map_err(|e| Box::new(e) as BoxError).boxed_unsync(), outcome, &rp));
        }
        Ok(Ok(_)) => outcome.write(StatusCode::SWITCHING_PROTOCOLS, 0, None, Some(GONE)),
        Ok(Err(e)) if e.is_connect() => {
            let status = Code::UpstreamUnavailable.status(upstream_error(&e).0);
            outcome.write_with_usage(status, 0, None, Some(GONE), body::UsageRead::Unsent)
        }
        Ok(Err(e)) => outcome.write(Code::UpstreamUnavailable.status(upstream_error(&e).0), 0, None, Some(GONE)),
        Err(_) => outcome.write(Code::UpstreamTimeout.status(At::Request), 0, None, Some(GONE)),
    }
}

/// A recorded request that is refused before anything is sent: an LLM call's token estimate
/// is released (nothing reached the upstream, so nothing is charged).
fn unsent(gw: &App, facts: &Facts) {
    gw.budgets().settle_later(&facts.request_id, Settlement::Tokens(token_use(facts, 0)));
}

fn token_use(facts: &Facts, tokens: u64) -> TokenUse {
    TokenUse {
        agent: facts.caller.agent.clone().unwrap_or_default(),
        connector: facts.action.connector.clone().unwrap_or_default(),
        action: facts.action.name.clone().unwrap_or_default(),
        tokens,
        at: crate::clock::now_unix(),
    }
}

/// A body not buffered (so not hashed in the decision entry) is hashed as it streams to the
/// upstream, for the `outcome` entry (`audit.bodies: hash` or `full`; an upgrade's request body
/// too). A buffered body, or `audit.bodies: none`, goes out as it is.
fn hash_streamed(facts: &Facts, body: ProxyBody) -> (ProxyBody, Option<RequestDigest>) {
    // (A body known to be empty — a GET without a length — has nothing to hash.)
    if facts.body.hash.is_some() || facts.body.mode == BodiesMode::None || http_body::Body::is_end_stream(&body) {
        return (body, None);
    }
    let digest = RequestDigest::new(facts.body.mode == BodiesMode::Full);
    (HashedBody::new(body, digest.clone()).boxed_unsync(), Some(digest))
}

/// The message of `upstream_timeout`.
const UPSTREAM_TIMEOUT: &str = "the upstream did not answer within limits.upstream_timeout";

/// How an exchange that failed is answered (`upstream_unavailable`, 504 when connecting timed
/// out), and why.
fn upstream_error(e: &hyper_util::client::legacy::Error) -> (At, &'static str) {
    let text = format!("{e:?}");
    if text.contains("certificate") || text.contains("InvalidCertificate") || text.contains("AlertReceived") {
        (At::Request, "the upstream TLS handshake failed")
    } else if e.is_connect() {
        if text.contains("TimedOut") || text.contains("timed out") {
            (At::ConnectTimeout, "connecting to the upstream timed out")
        } else {
            (At::Request, "the upstream is unreachable")
        }
    } else {
        (At::Request, "the upstream failed before answering")
    }
}
