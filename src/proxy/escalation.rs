//! Escalations on the wire (SPEC §7, §9): `reject` answers 403 with the approval id; `hold`
//! parks the request (a future, not a thread) until a human decides, the hold times out, or the
//! gateway shuts down. Decisions made through the admin API land here, are audited, and wake
//! the held request.

use super::{Facts, Gateway, now_unix};
use crate::approvals::{Approval, ApprovalError, Status};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;

/// How a held request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Approved,
    Denied,
    TimedOut,
    ShuttingDown,
}

/// Held requests by approval id.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, oneshot::Sender<Resolution>>>,
}

impl Waiters {
    fn register(&self, id: &str) -> oneshot::Receiver<Resolution> {
        let (tx, rx) = oneshot::channel();
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), tx);
        rx
    }
    fn wake(&self, id: &str, r: Resolution) {
        if let Some(tx) = self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(id) {
            let _ = tx.send(r);
        }
    }
    fn forget(&self, id: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub(crate) fn approval_entry(
    id: &str,
    event: &str,
    agent: Option<&str>,
    extra: &[(&str, Value)],
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("kind".into(), json!("approval"));
    m.insert("approval_id".into(), json!(id));
    m.insert("event".into(), json!(event));
    m.insert("agent".into(), json!(agent));
    for (k, v) in extra {
        m.insert((*k).to_string(), v.clone());
    }
    m
}

/// Waits for the human decision on a held request.
pub(super) async fn hold(gw: &Gateway, facts: &Facts, id: &str, timeout: Duration) -> Resolution {
    let rx = gw.waiters.register(id);
    let mut stopping = gw.stopping.subscribe();
    let r = tokio::select! {
        r = rx => r.unwrap_or(Resolution::ShuttingDown),
        _ = tokio::time::sleep(timeout) => Resolution::TimedOut,
        _ = stopping.wait_for(|s| *s) => Resolution::ShuttingDown,
    };
    gw.waiters.forget(id);
    if r == Resolution::TimedOut {
        let store = gw.approvals.clone();
        let id2 = id.to_string();
        let expired = tokio::task::spawn_blocking(move || {
            store.transition(&id2, Status::Pending, Status::Expired, i64::MAX, |_| {})
        })
        .await;
        if matches!(expired, Ok(Ok(_))) {
            let _ = gw.audit.append_nowait(approval_entry(
                id,
                "expired",
                facts.agent.as_deref(),
                &[("why", json!("hold_timeout"))],
            ));
        } else if let Ok(Ok(Some(a))) = {
            let store = gw.approvals.clone();
            let id2 = id.to_string();
            tokio::task::spawn_blocking(move || store.get(&id2)).await.map(|r| r.map_err(|_| ()))
        } {
            // Decided in the same instant the hold ran out: the decision wins.
            return match a.status {
                Status::Approved => Resolution::Approved,
                Status::Denied => Resolution::Denied,
                _ => Resolution::TimedOut,
            };
        }
    }
    r
}

/// What an approve/deny call produced.
pub struct Decided {
    pub approval: Approval,
    /// The override token (approve only), shown once.
    pub override_token: Option<String>,
}

/// Approves or denies a pending approval, records it, and wakes a held request.
pub async fn decide_approval(
    gw: &Gateway,
    id: &str,
    approve: bool,
    decided_by: &str,
    note: Option<String>,
    ttl: Option<Duration>,
) -> Result<Decided, ApprovalError> {
    let store = gw.approvals.clone();
    let (id2, by) = (id.to_string(), decided_by.to_string());
    let to = if approve { Status::Approved } else { Status::Denied };
    let note2 = note.clone();
    let approval = tokio::task::spawn_blocking(move || {
        store.transition(&id2, Status::Pending, to, now_unix(), |a| {
            a.note = note2;
            a.decided_by = Some(by);
        })
    })
    .await
    .map_err(|e| ApprovalError::Store(e.to_string()))??;
    let mut override_token = None;
    let mut extra = vec![("decided_by", json!(decided_by)), ("note", json!(note))];
    if approve {
        let ttl = ttl.unwrap_or_else(|| {
            gw.policies.load().set.get(&approval.agent).map_or(Duration::from_secs(300), |m| m.escalation.override_ttl)
        });
        match crate::identity::mint_override(
            &gw.gateway_key,
            &approval.agent,
            &approval.id,
            &approval.action_hash,
            ttl.as_secs() as i64,
            now_unix(),
        ) {
            Ok((token, claims)) => {
                extra.push(("override_jti", json!(claims.jti)));
                extra.push(("override_exp", json!(claims.exp.to_string())));
                override_token = Some(token);
            }
            Err(e) => return Err(ApprovalError::Store(format!("minting the override token: {e}"))),
        }
    }
    let event = if approve { "approved" } else { "denied" };
    if let Err(e) = gw.audit.append(approval_entry(id, event, Some(&approval.agent), &extra)).await {
        tracing::error!(approval_id = %id, error = %e, "approval decision not recorded");
        return Err(ApprovalError::Store("the audit log cannot commit".into()));
    }
    gw.waiters.wake(id, if approve { Resolution::Approved } else { Resolution::Denied });
    Ok(Decided { approval, override_token })
}

/// Marks pending approvals past their expiry as expired, with an audit entry each.
pub async fn expire_due(gw: &Gateway) {
    let store = gw.approvals.clone();
    let Ok(Ok(expired)) = tokio::task::spawn_blocking(move || store.expire_overdue(now_unix())).await else { return };
    for a in expired {
        let _ =
            gw.audit.append_nowait(approval_entry(&a.id, "expired", Some(&a.agent), &[("why", json!("approval_ttl"))]));
    }
}
