//! Stage 5, settling a decision (SPEC §8 steps 8–10): the budget is reserved, an escalation is
//! lifted by a valid override or by a human while the request is held (or answered with its
//! approval id), and the rate limits are taken. What is reserved is given back when the request
//! stops before it is recorded (the guards release on drop); an approval the request goes out
//! under is consumed only in the commit of its decision entry (`forward::commit`).

use super::classify::{Classified, RequestBody};
use super::escalation::{Escalated, escalate};
use super::identify::Identity;
use super::{Facts, Gateway, Stop, hygiene, now_unix};
use crate::approvals::Status;
use crate::config::PolicyMode;
use crate::limits::{BudgetCheck, Budgets, RateTaken, Reservation};
use crate::policy::{Decision, Reason, Verdict};
use http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use std::sync::Arc;

/// The approval a request goes out under.
pub(crate) struct Grant {
    pub approval_id: String,
    /// The override token's `jti` (absent for a held request approved while it waited).
    pub jti: Option<String>,
}

/// A budget slot that goes back unless the request is recorded and counted.
pub(crate) struct BudgetSlot<'a> {
    budgets: &'a Budgets,
    reservation: Option<Reservation>,
}

impl BudgetSlot<'_> {
    pub fn commit(mut self) {
        if let Some(r) = self.reservation.take() {
            r.commit();
        }
    }
}

impl Drop for BudgetSlot<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            self.budgets.release(r);
        }
    }
}

/// A decision ready to be recorded, with what it holds.
pub(crate) struct Settled<'a> {
    pub decision: Decision,
    pub dry_run: bool,
    pub budget: Option<BudgetSlot<'a>>,
    pub rate: Option<RateTaken<'a>>,
    pub grant: Option<Grant>,
}

/// Reserves a budget slot for `action`; `Err` is `budget_exceeded`, `Ok` may carry the
/// `budget_threshold_reached` escalation reason.
fn reserve<'a>(
    gw: &'a Gateway,
    who: &Identity,
    action: &Classified,
) -> Result<(BudgetSlot<'a>, Option<Reason>), Reason> {
    match gw.budgets.reserve(&who.manifest, action.spend(&who.manifest)) {
        BudgetCheck::Exceeded(r) => Err(r),
        BudgetCheck::Reserved { reservation, threshold } => {
            Ok((BudgetSlot { budgets: &gw.budgets, reservation: Some(reservation) }, threshold))
        }
    }
}

pub(crate) async fn settle<'a>(
    gw: &'a Arc<Gateway>,
    who: &'a Identity,
    action: &'a Classified,
    mut decision: Decision,
    parts: &Parts,
    body: &mut RequestBody,
    facts: &mut Facts,
) -> Result<Settled<'a>, Stop> {
    let manifest = &who.manifest;
    let dry_run = manifest.mode == PolicyMode::DryRun;

    // 8. budgets; reserved also without budgets, so counters are what a rebuild from the log
    // finds when a reload adds one.
    let mut budget = None;
    if decision.verdict != Verdict::Deny {
        match reserve(gw, who, action) {
            Err(r) => decision = Decision { verdict: Verdict::Deny, reasons: vec![r] },
            Ok((slot, threshold)) => {
                budget = Some(slot);
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
        facts.bound_headers = hygiene::bound_headers(&parts.headers, &action.connector);
        // The action hash covers the body, so an escalated request's body is read now.
        body.buffer(&parts.headers, &gw.config.limits, facts).await?;
        if let Some(tok) = parts.headers.get("x-uapk-override").and_then(|v| v.to_str().ok()) {
            match check_override(gw, facts, tok).await {
                Ok(g) => {
                    let mut d = Decision::allow();
                    d.reasons.push(Reason::new("override_accepted", format!("approved by {}", g.approval_id)));
                    decision = d;
                    grant = Some(g);
                }
                Err(d) => decision = d,
            }
        }
    }
    if decision.verdict == Verdict::Deny {
        budget = None;
    }

    // Refusals and escalations (enforce mode; dry run records the would-be decision and goes on).
    if !dry_run {
        match decision.verdict {
            Verdict::Deny => return Err(Stop::forbidden(decision)),
            Verdict::Escalate => {
                // The slot goes back while the request waits (or is answered with its id).
                drop(budget.take());
                let id = match escalate(gw, facts, manifest, decision).await {
                    Escalated::Respond(resp) => return Err(Stop::respond(resp)),
                    Escalated::Approved(id) => id,
                };
                // Approved while held: counted again, and rate-limited like any request that
                // is about to leave.
                let (slot, _) = reserve(gw, who, action)
                    .map_err(|r| Stop::forbidden(Decision { verdict: Verdict::Deny, reasons: vec![r] }))?;
                budget = Some(slot);
                let mut d = Decision::allow();
                d.reasons.push(Reason::new("approval_granted", format!("approved in {id}")));
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
        match gw.rate_limits.check(manifest, &action.connector.name, action.action()) {
            Ok(taken) => rate = Some(taken),
            Err(limited) => {
                budget = None;
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
                        status: StatusCode::TOO_MANY_REQUESTS,
                        decision: d,
                        record: true,
                        headers: Some(Box::new(headers)),
                    });
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
async fn check_override(gw: &Gateway, facts: &Facts, token: &str) -> Result<Grant, Decision> {
    let invalid = |m: &str| Decision::deny("override_token_invalid", m.to_string());
    let claims = crate::identity::verify_override(token, &gw.gateway_key.verifying_key(), now_unix())
        .map_err(|_| invalid("the override token is not valid"))?;
    if Some(&claims.sub) != facts.agent.as_ref() {
        return Err(invalid("the override token was issued to another agent"));
    }
    if claims.action_hash != facts.action_hash() {
        return Err(invalid("the override token was issued for a different action"));
    }
    match gw.approvals.fetch(&claims.approval_id).await {
        Ok(Some(a)) if a.status_at(now_unix()) == Status::Approved => {
            Ok(Grant { approval_id: claims.approval_id, jti: Some(claims.jti) })
        }
        Ok(Some(a)) if a.status == Status::Consumed => {
            Err(Decision::deny("override_token_already_used", "the override token was already used"))
        }
        _ => Err(invalid("the approval behind the override token is not approved")),
    }
}
