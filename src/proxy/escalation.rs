//! Escalations on the wire (SPEC §7, §9): `reject` answers 403 with the approval id; `hold`
//! parks the request (a future, not a thread) until a human decides, the hold times out, or the
//! gateway shuts down. The approvals themselves live in `crate::approvals`.

use super::respond::DenyBody;
use super::{App, Facts, Stop, refuse};
use crate::approvals::{self, Resolution, Status, approval_entry};
use crate::clock::now_unix;
use crate::config::{BodiesMode, EscalationMode, Manifest};
use crate::policy::{At, Code, Decision};
use http::HeaderValue;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Waits for the human decision on a held request.
pub(super) async fn hold(gw: &App, facts: &Facts, id: &str, timeout: Duration) -> Resolution {
    let rx = gw.approvals().hold(id);
    let mut stopping = gw.stopping();
    let r = tokio::select! {
        r = rx => r.unwrap_or(Resolution::ShuttingDown),
        _ = tokio::time::sleep(timeout) => Resolution::TimedOut,
        _ = stopping.wait_for(|s| *s) => Resolution::ShuttingDown,
    };
    gw.approvals().release_hold(id);
    if r == Resolution::TimedOut {
        return gw.approvals().expire_held(gw.audit(), id, facts.caller.agent.as_deref()).await;
    }
    r
}

/// Past `max_pending`: a refusal, recorded like any other.
fn too_many(pending: usize, max: usize) -> Stop {
    Stop::refuse(Decision::deny(
        Code::TooManyPendingApprovals,
        format!("{pending} approvals of this agent are pending (escalation.max_pending {max}); wait for decisions"),
    ))
}

/// ESCALATE: store a pending approval and record it; `reject` answers 403 with its id, `hold`
/// waits for the decision. `Ok` is the approval a held request was granted: it proceeds under it.
pub(super) async fn escalate(
    gw: &Arc<App>,
    facts: &Facts,
    manifest: &Manifest,
    decision: Decision,
) -> Result<String, Stop> {
    // One agent cannot pile up approvals (memory, the operator's list): past its
    // `max_pending` the escalation is a refusal, recorded like any other.
    let agent = facts.caller.agent.clone().unwrap_or_default();
    let max = manifest.escalation.max_pending;
    let slot = match gw.approvals().reserve(&agent, max).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(pending)) => return Err(too_many(pending, max)),
        Err(e) => {
            tracing::error!(error = %e, "approvals store unavailable");
            let d = Decision::deny(
                Code::ApprovalStoreUnavailable,
                "the approvals queue cannot be reached; nothing was forwarded",
            );
            return Err(Stop::refuse(d));
        }
    };
    let id = approvals::new_id();
    let idx = match gw.record(facts, &decision, Some(&id)).await {
        Ok(i) => i,
        Err(resp) => {
            gw.approvals().unreserve(&agent, slot).await;
            return Err(Stop::respond(resp));
        }
    };
    let now = now_unix();
    let approval = approvals::Approval {
        id: id.clone(),
        agent: facts.caller.agent.clone().unwrap_or_default(),
        connector: facts.action.connector.clone().unwrap_or_default(),
        action: facts.action.name.clone().unwrap_or_default(),
        params: facts.action.params.clone(),
        method: facts.line.method.to_string(),
        scheme: facts.line.scheme.as_str().to_string(),
        host: facts.line.host.clone(),
        port: facts.line.port,
        path: facts.line.path.clone(),
        query: facts.line.query.clone(),
        headers: facts.settled.bound_headers.clone(),
        // `audit.bodies: none` keeps the body hash out of the approval too (the action hash
        // binds it all the same).
        body_sha256: facts.body.hash.as_ref().filter(|_| facts.body.mode != BodiesMode::None).map(|b| b.0.clone()),
        body_len: facts.body.hash.as_ref().filter(|_| facts.body.mode != BodiesMode::None).map(|b| b.1),
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
    if gw.approvals().store(approval, slot).await.is_err() {
        tracing::error!(approval_id = %id, "cannot store approval");
        let d = Decision::deny(Code::ApprovalStoreUnavailable, "the approval could not be stored");
        return Err(Stop::respond(refuse(At::Request, facts, &d, Some(idx), DenyBody::default())));
    }
    let created = approval_entry(
        &id,
        "created",
        approvals::BY_GATEWAY,
        facts.caller.agent.as_deref(),
        &[("request_id", json!(facts.request_id))],
    );
    let _ = gw.audit().append_nowait(created);
    if manifest.escalation.mode == EscalationMode::Hold {
        let d = match hold(gw, facts, &id, manifest.escalation.hold_timeout).await {
            Resolution::Approved => return Ok(id),
            Resolution::Denied => Decision::deny(Code::ApprovalDenied, format!("approval {id} was denied")),
            Resolution::TimedOut => {
                Decision::deny(Code::ApprovalTimeout, format!("approval {id} was not decided in time"))
            }
            Resolution::ShuttingDown => {
                let d = Decision::deny(Code::ShuttingDown, "the gateway is shutting down; retry");
                let resp = refuse(At::Request, facts, &d, Some(idx), DenyBody { approval_id: Some(id) });
                return Err(Stop::respond(resp));
            }
        };
        return Err(Stop::refuse_always(d));
    }
    let mut resp = refuse(At::Request, facts, &decision, Some(idx), DenyBody { approval_id: Some(id.clone()) });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-uapk-approval", v);
    }
    gw.finish_metrics(facts, &decision, decision.code().status(At::Request), Some(idx));
    Err(Stop::respond(resp))
}
