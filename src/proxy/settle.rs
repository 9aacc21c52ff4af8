//! Stage 5, settling a decision (SPEC §8 steps 8–10): the budget is reserved (for an LLM call,
//! with its token estimate, SPEC §16.1), an escalation is lifted by a valid override or by a
//! human while the request is held (or answered with its approval id), and the rate limits are
//! taken. A budget reservation is settled explicitly, by request id, on every path that stops
//! the request before it is forwarded (here and in `forward::commit`); one that is forwarded
//! settles its tokens with its `outcome` entry. An approval the request goes out under is
//! consumed only in the commit of its decision entry (`forward::commit`).

use super::classify::{Classified, RequestBody};
use super::escalation::escalate;
use super::identify::Identity;
use super::{App, Facts, Record, Stop, hygiene};
use crate::approvals::Status;
use crate::clock::now_unix;
use crate::config::PolicyMode;
use crate::limits::{Ask, BudgetCheck, RateRefused, RateTaken, Reservation};
use crate::policy::{At, Code, Decision, Reason, Verdict};
use http::{HeaderMap, HeaderValue, header, request::Parts};
use std::sync::Arc;

/// The approval a request goes out under.
pub(crate) struct Grant {
    pub approval_id: String,
    /// The override token's `jti` (absent for a held request approved while it waited).
    pub jti: Option<String>,
}

/// A decision ready to be recorded, with what it holds.
pub(crate) struct Settled<'a> {
    pub decision: Decision,
    pub dry_run: bool,
    /// Settled by `forward::commit`: kept when the request is recorded, else released.
    pub budget: Option<Reservation>,
    pub rate: Option<RateTaken<'a>>,
    pub grant: Option<Grant>,
}

/// Reserves the budget for `action` (with the request's token estimate, if it is an LLM call);
/// `Err` is `budget_exceeded`, `Ok` may carry the `budget_threshold_reached` escalation reason.
async fn reserve(
    gw: &App,
    who: &Identity,
    action: &Classified,
    facts: &Facts,
) -> Result<Result<(Reservation, Option<Reason>), Reason>, Stop> {
    let ask =
        Ask { id: facts.request_id.clone(), spend: action.spend(&who.manifest), tokens: facts.settled.token_estimate };
    match gw.budgets().reserve(&who.manifest, ask).await {
        Ok(BudgetCheck::Exceeded(r)) => Ok(Err(r)),
        Ok(BudgetCheck::Reserved { reservation, threshold }) => Ok(Ok((reservation, threshold))),
        Err(e) => Err(Stop::respond(gw.audit_failure(facts, crate::audit::AuditError::Storage(e)))),
    }
}

/// Gives back what a request that stops before it is forwarded reserved.
pub(crate) async fn release(gw: &App, budget: Option<Reservation>) {
    if let Some(r) = budget {
        gw.budgets().release(r).await;
    }
}

/// The tokens an LLM call reserves (SPEC §16.1). Under a `max_tokens` budget the body is read
/// first (within `limits.max_body_bytes`), so the estimate sees its declared output limit and
/// length; without one, a body nobody read is estimated from its `Content-Length`.
async fn token_estimate(
    gw: &App,
    who: &Identity,
    action: &Classified,
    parts: &Parts,
    body: &mut RequestBody,
    facts: &mut Facts,
) -> Result<Option<u64>, Stop> {
    let connector = &action.connector;
    if connector.usage.is_none() {
        return Ok(None);
    }
    if who.manifest.policy.budgets.iter().any(|b| b.max_tokens.is_some()) {
        body.buffer(&parts.headers, &gw.config().limits, facts).await?;
    }
    Ok(Some(match body.buffered() {
        Some(b) => crate::usage::estimate(b, connector.usage_estimate),
        None => {
            let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            connector.usage_estimate.saturating_add(declared.unwrap_or(0).div_ceil(4))
        }
    }))
}

pub(crate) async fn settle<'a>(
    gw: &'a Arc<App>,
    who: &'a Identity,
    action: &'a Classified,
    mut decision: Decision,
    parts: &Parts,
    body: &mut RequestBody,
    facts: &mut Facts,
) -> Result<Settled<'a>, Stop> {
    let manifest = &who.manifest;
    let dry_run = manifest.mode == PolicyMode::DryRun;

    // An LLM call's token estimate, for anything that may be forwarded (read before anything
    // is reserved: a body refused here holds nothing).
    if decision.verdict != Verdict::Deny || dry_run {
        facts.settled.token_estimate = token_estimate(gw, who, action, parts, body, facts).await?;
    }

    // 8. budgets; reserved also without budgets, so counters are what a rebuild from the log
    // finds when a reload adds one.
    let mut budget = None;
    if decision.verdict != Verdict::Deny {
        match reserve(gw, who, action, facts).await? {
            Err(r) => decision = Decision { verdict: Verdict::Deny, reasons: vec![r] },
            Ok((reservation, threshold)) => {
                budget = Some(reservation);
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

    // 10. an override lifts ESCALATE for the identical action (checked now, consumed with the
    // decision's commit).
    let mut grant = None;
    if decision.verdict == Verdict::Escalate {
        facts.settled.bound_headers = hygiene::bound_headers(&parts.headers, &action.connector);
        // The action hash covers the body, so an escalated request's body is read now.
        if let Err(stop) = body.buffer(&parts.headers, &gw.config().limits, facts).await {
            release(gw, budget.take()).await;
            return Err(stop);
        }
        if let Some(tok) = parts.headers.get("x-uapk-override").and_then(|v| v.to_str().ok()) {
            match check_override(gw, facts, tok).await {
                Ok(g) => {
                    let mut d = Decision::allow();
                    d.reasons.push(Reason::new(Code::OverrideAccepted, format!("approved by {}", g.approval_id)));
                    decision = d;
                    grant = Some(g);
                }
                Err(d) => decision = d,
            }
        }
    }
    if decision.verdict == Verdict::Deny {
        // Refused after reserving (an invalid override): nothing is forwarded.
        release(gw, budget.take()).await;
    }

    // Refusals and escalations (enforce mode; dry run records the would-be decision and goes on).
    if !dry_run {
        match decision.verdict {
            Verdict::Deny => return Err(Stop::refuse(decision)),
            Verdict::Escalate => {
                // The reservation goes back while the request waits (or is answered with its id).
                release(gw, budget.take()).await;
                // Answered here, while the agent's in-flight slot is still held.
                let id = match escalate(gw, facts, manifest, decision).await {
                    Ok(id) => id,
                    Err(stop) => return Err(Stop::respond(gw.answer(facts, stop).await)),
                };
                // Approved while held: counted again, and rate-limited like any request that
                // is about to leave.
                let (reservation, _) = reserve(gw, who, action, facts)
                    .await?
                    .map_err(|r| Stop::refuse(Decision { verdict: Verdict::Deny, reasons: vec![r] }))?;
                budget = Some(reservation);
                let mut d = Decision::allow();
                d.reasons.push(Reason::new(Code::ApprovalGranted, format!("approved in {id}")));
                decision = d;
                grant = Some(Grant { approval_id: id, jti: None });
            }
            Verdict::Allow => {}
        }
    }

    // 9. rate limits: only requests about to be forwarded take quota; every limit that applies is
    // checked before any is taken, and the quota goes back if the request stops before its
    // decision is recorded.
    let mut rate = None;
    if decision.verdict == Verdict::Allow {
        match gw.rate_limits().check(manifest, &action.connector.name, action.action()).await {
            Ok(taken) => rate = Some(taken),
            Err(RateRefused::Limited(limited)) => {
                // A request refused by a rate limit spends no budget (§8 step 9).
                release(gw, budget.take()).await;
                let d = Decision { verdict: Verdict::Deny, reasons: vec![limited.reason.clone()] };
                if !dry_run {
                    let mut headers = HeaderMap::new();
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(limited.retry_after.as_secs()));
                    if let Ok(v) = HeaderValue::from_str(&limited.policy) {
                        headers.insert("ratelimit-policy", v);
                    }
                    if let Ok(v) = HeaderValue::from_str(&limited.limit) {
                        headers.insert("ratelimit", v);
                    }
                    return Err(Stop::Refuse {
                        decision: d,
                        at: At::Request,
                        record: Record::WithinBudget,
                        headers: Some(Box::new(headers)),
                    });
                }
                decision = d;
            }
            Err(RateRefused::Unavailable(reason)) => {
                // The shared rate-limit state does not answer: fail closed (§15.4), spending
                // no budget.
                release(gw, budget.take()).await;
                let d = Decision { verdict: Verdict::Deny, reasons: vec![reason] };
                if !dry_run {
                    return Err(Stop::refuse(d));
                }
                decision = d;
            }
        }
    }
    Ok(Settled { decision, dry_run, budget, rate, grant })
}

/// Step 10: an override token lifts ESCALATE for the identical action, once. Checked here
/// (signature, agent, action hash, an approved approval); consumed atomically with the
/// decision entry that accepts it.
async fn check_override(gw: &App, facts: &Facts, token: &str) -> Result<Grant, Decision> {
    let invalid = |m: &str| Decision::deny(Code::OverrideTokenInvalid, m.to_string());
    let claims = gw.verify_override(token, now_unix()).map_err(|_| invalid("the override token is not valid"))?;
    if Some(&claims.sub) != facts.caller.agent.as_ref() {
        return Err(invalid("the override token was issued to another agent"));
    }
    if claims.action_hash != facts.action_hash() {
        return Err(invalid("the override token was issued for a different action"));
    }
    match gw.approvals().fetch(&claims.approval_id).await {
        Ok(Some(a)) if a.status_at(now_unix()) == Status::Approved => {
            Ok(Grant { approval_id: claims.approval_id, jti: Some(claims.jti) })
        }
        Ok(Some(a)) if a.status == Status::Consumed => {
            Err(Decision::deny(Code::OverrideTokenAlreadyUsed, "the override token was already used"))
        }
        _ => Err(invalid("the approval behind the override token is not approved")),
    }
}
