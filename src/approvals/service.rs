//! Approvals as the gateway runs them: the store plus the requests held for a decision, the
//! per-agent count of pending approvals (`escalation.max_pending`, `uapk_approvals_pending`,
//! kept incrementally so neither costs a scan), and the decisions themselves — approve, deny,
//! expire, consume — each written to the audit log. The data path and the admin API both call
//! in here; neither reaches into the other.

use super::{Approval, ApprovalError, ApprovalStore, Cursor, Status};
use crate::audit::AuditHandle;
pub(crate) use crate::config::BY_GATEWAY;
use ed25519_dalek::SigningKey;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;

/// A `max_pending` slot taken by [`Approvals::reserve`] (the fleet's holds a row).
#[derive(Debug)]
pub struct Slot(Option<String>);

/// How a held request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    Approved,
    Denied,
    TimedOut,
    ShuttingDown,
}

/// What an approve/deny call produced.
pub(crate) struct Decided {
    pub approval: Approval,
    /// The override token (approve only), shown once.
    pub override_token: Option<String>,
}

/// The approvals queue as the gateway runs it: the store (the embedded redb tables or the fleet's
/// PostgreSQL), the requests held for a decision and the per-agent count of pending approvals.
pub struct Approvals {
    /// The gateway's own queue (embedded); `None` with the fleet's.
    store: Option<ApprovalStore>,
    /// The fleet's queue (`state.backend: postgres`); `store` is then unused.
    fleet: Option<crate::state::postgres::PgApprovals>,
    /// The fleet's pending approvals as last counted (the gauge).
    fleet_pending: std::sync::atomic::AtomicU64,
    /// Held requests by approval id.
    waiters: Mutex<HashMap<String, oneshot::Sender<Resolution>>>,
    /// Stored pending approvals per agent.
    pending: Mutex<HashMap<String, usize>>,
}

use crate::clock::now_unix;

/// An `approval` audit entry. `by` is who made the event: the admin key id for approve and
/// deny, [`BY_GATEWAY`] for the events the gateway makes by itself.
pub(crate) fn approval_entry(
    id: &str,
    event: &str,
    by: &str,
    agent: Option<&str>,
    extra: &[(&str, Value)],
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("kind".into(), json!("approval"));
    m.insert("approval_id".into(), json!(id));
    m.insert("event".into(), json!(event));
    m.insert("by".into(), json!(by));
    m.insert("agent".into(), json!(agent));
    for (k, v) in extra {
        m.insert((*k).to_string(), v.clone());
    }
    m
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApprovalError> + Send + 'static,
) -> Result<T, ApprovalError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApprovalError::Store(e.to_string()))?
}

impl Approvals {
    pub(crate) fn new(store: ApprovalStore) -> Result<Approvals, ApprovalError> {
        let pending = store.pending_by_agent()?;
        Ok(Approvals {
            store: Some(store),
            fleet: None,
            fleet_pending: Default::default(),
            waiters: Mutex::default(),
            pending: Mutex::new(pending),
        })
    }

    /// The fleet's queue (SPEC §15.3).
    pub(crate) fn fleet(fleet: crate::state::postgres::PgApprovals) -> Approvals {
        Approvals {
            store: None,
            fleet: Some(fleet),
            fleet_pending: Default::default(),
            waiters: Mutex::default(),
            pending: Mutex::default(),
        }
    }

    /// Held requests whose approval was decided on another gateway of the fleet are woken here
    /// (called about every 250 ms), and the fleet's pending count refreshed.
    pub(crate) async fn poll_fleet(&self) {
        let Some(f) = &self.fleet else { return };
        let ids: Vec<String> = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        if !ids.is_empty()
            && let Ok(decided) = f.decided(ids).await
        {
            for (id, status) in decided {
                let r = match status {
                    Status::Approved | Status::Consumed => Resolution::Approved,
                    Status::Denied => Resolution::Denied,
                    _ => Resolution::TimedOut,
                };
                self.wake(&id, r);
            }
        }
        if let Ok(n) = f.pending_total(now_unix()).await {
            self.fleet_pending.store(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn local(&self) -> Result<ApprovalStore, ApprovalError> {
        self.store.clone().ok_or_else(|| ApprovalError::Store("no local approvals store".into()))
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn left_pending(&self, agent: &str) {
        let mut c = self.counts();
        if let Some(n) = c.get_mut(agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(agent);
            }
        }
    }

    /// Pending approvals of all agents (the `uapk_approvals_pending` gauge).
    pub(crate) fn pending_total(&self) -> u64 {
        if self.fleet.is_some() {
            return self.fleet_pending.load(std::sync::atomic::Ordering::Relaxed);
        }
        self.counts().values().map(|&n| n as u64).sum()
    }

    /// The approval with this id as stored, or `None` when there is none.
    pub async fn fetch(&self, id: &str) -> Result<Option<Approval>, ApprovalError> {
        if let Some(f) = &self.fleet {
            return f.get(id).await;
        }
        let (store, id) = (self.local()?, id.to_string());
        blocking(move || store.get(&id)).await
    }

    pub(crate) async fn page(
        &self,
        status: Option<Status>,
        limit: usize,
        cursor: Option<Cursor>,
    ) -> Result<(Vec<Approval>, Option<Cursor>), ApprovalError> {
        if let Some(f) = &self.fleet {
            return f.page(status, limit, cursor, now_unix()).await;
        }
        let store = self.local()?;
        blocking(move || store.page(status, limit, cursor.as_ref(), now_unix())).await
    }

    /// Takes one of `agent`'s `max_pending` slots before its approval is recorded and stored,
    /// so concurrent escalations cannot overshoot (across the fleet with the fleet's queue);
    /// `Ok(Err(n))` says how many are pending. A taken slot is either filled by `store` or given
    /// back with `unreserve`.
    pub async fn reserve(&self, agent: &str, max_pending: usize) -> Result<Result<Slot, usize>, ApprovalError> {
        if let Some(f) = &self.fleet {
            return Ok(f.reserve(agent, max_pending).await?.map(|s| Slot(Some(s))));
        }
        let mut c = self.counts();
        let n = c.entry(agent.to_string()).or_default();
        if *n >= max_pending {
            return Ok(Err(*n));
        }
        *n += 1;
        Ok(Ok(Slot(None)))
    }

    pub(crate) async fn unreserve(&self, agent: &str, slot: Slot) {
        match (&self.fleet, slot.0) {
            (Some(f), Some(s)) => f.unreserve(&s).await,
            _ => self.left_pending(agent),
        }
    }

    /// Stores a new pending approval in the slot `reserve` took (given back on failure).
    pub async fn store(&self, a: Approval, slot: Slot) -> Result<(), ApprovalError> {
        if let Some(f) = &self.fleet {
            return f.put(&a, slot.0).await;
        }
        let (store, agent) = (self.local()?, a.agent.clone());
        let r = blocking(move || store.put(&a)).await;
        if r.is_err() {
            self.left_pending(&agent);
        }
        r
    }

    /// Moves one approval between states; keeps the pending count in step.
    pub async fn transition(&self, id: &str, from: Status, to: Status, now: i64) -> Result<Approval, ApprovalError> {
        self.transition_with(id, from, to, now, |_| {}).await
    }

    async fn transition_with(
        &self,
        id: &str,
        from: Status,
        to: Status,
        now: i64,
        edit: impl FnOnce(&mut Approval) + Send + 'static,
    ) -> Result<Approval, ApprovalError> {
        if let Some(f) = &self.fleet {
            return f.transition(id, from, to, now, edit).await;
        }
        let (store, id) = (self.local()?, id.to_string());
        let a = blocking(move || store.transition(&id, from, to, now, edit)).await?;
        if from == Status::Pending && to != Status::Pending {
            self.left_pending(&a.agent);
        }
        Ok(a)
    }

    /// Registers a held request; its receiver resolves when a human decides.
    pub(crate) fn hold(&self, id: &str) -> oneshot::Receiver<Resolution> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), tx);
        rx
    }

    pub(crate) fn release_hold(&self, id: &str) {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    fn wake(&self, id: &str, r: Resolution) {
        if let Some(tx) = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(id) {
            let _ = tx.send(r);
        }
    }

    /// Approves or denies a pending approval, records it, and wakes a held request. An
    /// approval's override token is valid for `override_ttl`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn decide(
        &self,
        audit: &AuditHandle,
        key: &SigningKey,
        id: &str,
        approve: bool,
        decided_by: &str,
        note: Option<String>,
        override_ttl: Duration,
    ) -> Result<Decided, ApprovalError> {
        let to = if approve { Status::Approved } else { Status::Denied };
        let (by, note2) = (decided_by.to_string(), note.clone());
        let now = now_unix();
        let override_expires_at = now.saturating_add(override_ttl.as_secs().min(i64::MAX as u64) as i64);
        let approval = self
            .transition_with(id, Status::Pending, to, now, move |a| {
                a.note = note2;
                a.decided_by = Some(by);
                if approve {
                    a.override_expires_at = Some(override_expires_at);
                }
            })
            .await?;
        let mut override_token = None;
        let mut extra = vec![("decided_by", json!(decided_by)), ("note", json!(note))];
        if approve {
            let (token, jti) = self.mint_override(key, &approval, now)?;
            extra.push(("override_jti", json!(jti)));
            extra.push(("override_exp", json!(override_expires_at.to_string())));
            override_token = Some(token);
        }
        let event = if approve { "approved" } else { "denied" };
        if let Err(e) = audit.append(approval_entry(id, event, decided_by, Some(&approval.agent), &extra)).await {
            tracing::error!(approval_id = %id, error = %e, "approval decision not recorded");
            return Err(ApprovalError::Store("the audit log cannot commit".into()));
        }
        self.wake(id, if approve { Resolution::Approved } else { Resolution::Denied });
        Ok(Decided { approval, override_token })
    }

    /// An override token for an approved approval, valid until its `override_expires_at`;
    /// returns the token and its `jti`.
    pub(crate) fn mint_override(
        &self,
        key: &SigningKey,
        a: &Approval,
        now: i64,
    ) -> Result<(String, String), ApprovalError> {
        let exp = a.override_expires_at.unwrap_or(now);
        crate::identity::mint_override(key, &a.agent, &a.id, &a.action_hash, exp.saturating_sub(now), now)
            .map(|(token, claims)| (token, claims.jti))
            .map_err(|e| ApprovalError::Store(format!("minting the override token: {e}")))
    }

    /// A held request ran out of time: expire its approval (a decision made in the same
    /// instant wins) and say how it ended.
    pub(crate) async fn expire_held(&self, audit: &AuditHandle, id: &str, agent: Option<&str>) -> Resolution {
        if self.transition(id, Status::Pending, Status::Expired, i64::MAX).await.is_ok() {
            let _ = audit.append_nowait(approval_entry(
                id,
                "expired",
                BY_GATEWAY,
                agent,
                &[("why", json!("hold_timeout"))],
            ));
            return Resolution::TimedOut;
        }
        match self.fetch(id).await {
            Ok(Some(a)) if a.status == Status::Approved => Resolution::Approved,
            Ok(Some(a)) if a.status == Status::Denied => Resolution::Denied,
            _ => Resolution::TimedOut,
        }
    }

    /// Marks pending approvals past their expiry as expired, with an audit entry each.
    pub(crate) async fn expire_due(&self, audit: &AuditHandle) {
        let expired = match &self.fleet {
            Some(f) => f.expire_overdue(now_unix()).await,
            None => match self.local() {
                Ok(store) => blocking(move || store.expire_overdue(now_unix())).await,
                Err(e) => Err(e),
            },
        };
        let Ok(expired) = expired else { return };
        for a in expired {
            self.left_pending(&a.agent);
            let _ = audit.append_nowait(approval_entry(
                &a.id,
                "expired",
                BY_GATEWAY,
                Some(&a.agent),
                &[("why", json!("approval_ttl"))],
            ));
        }
    }
}
