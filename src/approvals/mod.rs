//! Escalations waiting for a human (SPEC §9). An ESCALATE decision creates a pending approval
//! (`appr-<24 hex>`) stored in the gateway's redb file, next to the audit tables, so it
//! survives restarts. Every state change is also written to the audit log by the caller.

mod service;

pub use service::Approvals;
pub(crate) use service::{BY_GATEWAY, Decided, Resolution, approval_entry};

use crate::audit::SharedDb;
use crate::policy::Code;
use rand::RngCore;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");
/// Every approval by (created_at, id): pages newest first without reading the whole table.
const BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("approvals_by_time");
/// Pending approvals only, by (created_at, id): the operator page's list and expiry read this.
const PENDING: TableDefinition<(u64, &str), ()> = TableDefinition::new("approvals_pending");

/// Where an approval is in its life: pending until approved, denied or expired; approved until its
/// override token is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for an approver's decision, until `expires_at`.
    Pending,
    /// Approved; its override token is valid until `override_expires_at`.
    Approved,
    /// Denied by an approver.
    Denied,
    /// Not decided before `expires_at` (`escalation.approval_ttl` after it was created).
    Expired,
    /// Approved and its override token used.
    Consumed,
}

impl Status {
    /// The status as the admin API, the store and the audit log write it (`pending`, `approved`,
    /// `denied`, `expired`, `consumed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Expired => "expired",
            Status::Consumed => "consumed",
        }
    }
}

/// A reason of the escalated decision, as stored with the approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonRecord {
    /// The reason code, e.g. `amount_requires_approval`.
    pub code: String,
    /// Its human-readable message (never a secret).
    pub message: String,
}

/// One approval as stored and as shown by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The approval id: `appr-` and 24 hex digits.
    pub id: String,
    /// Id of the agent whose request was escalated.
    pub agent: String,
    /// Name of the connector the request was for.
    pub connector: String,
    /// The request's action type (its route's or tool's `action`).
    pub action: String,
    /// The params its route declares, as read from the request (canonical values as strings).
    pub params: BTreeMap<String, String>,
    /// The request's HTTP method.
    pub method: String,
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: String,
    /// The upstream host the request named.
    pub host: String,
    /// The upstream port.
    #[serde(default)]
    pub port: u16,
    /// The upstream path, without the query.
    pub path: String,
    /// The query string without `?`, when the request had one.
    #[serde(default)]
    pub query: Option<String>,
    /// The forwarded request headers the override is bound to (SPEC §14.7).
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
    /// SHA-256 (hex) and length of the request body the override is bound to.
    #[serde(default)]
    pub body_sha256: Option<String>,
    /// Length in bytes of that body; `None` when `body_sha256` is.
    #[serde(default)]
    pub body_len: Option<u64>,
    /// SHA-256 (hex) of the canonical action (SPEC §6); an override is valid only for it.
    pub action_hash: String,
    /// Why the request was escalated: the reasons of its ESCALATE decision.
    pub reasons: Vec<ReasonRecord>,
    /// The stored status; a pending approval past `expires_at` is expired whatever this says.
    pub status: Status,
    /// Unix seconds.
    pub created_at: i64,
    /// When a pending approval expires, unix seconds (`created_at` + `escalation.approval_ttl`).
    pub expires_at: i64,
    /// Index of the audit record of the escalated decision.
    pub record: u64,
    /// The note the approver gave with approve or deny, if any.
    #[serde(default)]
    pub note: Option<String>,
    /// Id of the admin key that approved or denied it (`admin.keys[].id`); `None` while undecided.
    #[serde(default)]
    pub decided_by: Option<String>,
    /// When an override for it stops being valid (set when approved; unix seconds).
    #[serde(default)]
    pub override_expires_at: Option<i64>,
}

impl Approval {
    /// The status as of `now`: a pending approval past its expiry is expired.
    pub(crate) fn status_at(&self, now: i64) -> Status {
        if self.status == Status::Pending && self.expires_at <= now { Status::Expired } else { self.status }
    }
    fn time_key(&self) -> (u64, &str) {
        (self.created_at.max(0) as u64, self.id.as_str())
    }
}

/// Where the next page of a listing starts (opaque to clients: `<created_at>-<id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) created_at: u64,
    pub(crate) id: String,
}

impl Cursor {
    pub(crate) fn parse(s: &str) -> Option<Cursor> {
        let (t, id) = s.split_once('-')?;
        let created_at = t.parse().ok()?;
        (id.starts_with("appr-") && id.len() == 29).then(|| Cursor { created_at, id: id.to_string() })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.created_at, self.id)
    }
}

/// Why an approval operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// The approval store (redb or PostgreSQL) or the audit log could not do it; the message says
    /// why.
    #[error("approval store: {0}")]
    Store(String),
    /// No approval has this id.
    #[error("approval {0} not found")]
    NotFound(String),
    /// The approval was already decided, expired or consumed.
    #[error("approval {id} is {status}, not pending")]
    NotPending {
        /// The approval's id.
        id: String,
        /// Its current status, as [`Status::as_str`] writes it.
        status: &'static str,
    },
}

fn store_err(e: impl std::fmt::Display) -> ApprovalError {
    ApprovalError::Store(e.to_string())
}

/// The approvals table in the gateway's database, with two index tables kept in the same
/// transactions.
#[derive(Clone)]
pub(crate) struct ApprovalStore {
    db: SharedDb,
}

/// A new approval id: `appr-` and 24 random hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    format!("appr-{}", hex::encode(b))
}

impl ApprovalStore {
    /// Opens the tables; a database from before the index tables gets them built once.
    pub(crate) fn open(db: SharedDb) -> Result<Self, ApprovalError> {
        let tx = db.get().map_err(store_err)?.begin_write().map_err(store_err)?;
        {
            let t = tx.open_table(APPROVALS).map_err(store_err)?;
            let mut by_time = tx.open_table(BY_TIME).map_err(store_err)?;
            let mut pending = tx.open_table(PENDING).map_err(store_err)?;
            if by_time.len().map_err(store_err)? == 0 && t.len().map_err(store_err)? > 0 {
                for item in t.iter().map_err(store_err)? {
                    let (_, v) = item.map_err(store_err)?;
                    let a: Approval = serde_json::from_slice(v.value()).map_err(store_err)?;
                    by_time.insert(a.time_key(), ()).map_err(store_err)?;
                    if a.status == Status::Pending {
                        pending.insert(a.time_key(), ()).map_err(store_err)?;
                    }
                }
            }
        }
        tx.commit().map_err(store_err)?;
        Ok(ApprovalStore { db })
    }

    pub(crate) fn put(&self, a: &Approval) -> Result<(), ApprovalError> {
        let bytes = serde_json::to_vec(a).map_err(store_err)?;
        let tx = self.db.get().map_err(store_err)?.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(APPROVALS).map_err(store_err)?;
            t.insert(a.id.as_str(), bytes.as_slice()).map_err(store_err)?;
            tx.open_table(BY_TIME).map_err(store_err)?.insert(a.time_key(), ()).map_err(store_err)?;
            if a.status == Status::Pending {
                tx.open_table(PENDING).map_err(store_err)?.insert(a.time_key(), ()).map_err(store_err)?;
            }
        }
        tx.commit().map_err(store_err)
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<Approval>, ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_read().map_err(store_err)?;
        let t = tx.open_table(APPROVALS).map_err(store_err)?;
        match t.get(id).map_err(store_err)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(store_err),
            None => Ok(None),
        }
    }

    /// One page of approvals, newest first, optionally of one status (as of `now`: pending
    /// ones past their expiry count as expired), starting after `cursor`; with the cursor of
    /// the next page when there may be more. `status=pending` reads only the pending index.
    pub(crate) fn page(
        &self,
        status: Option<Status>,
        limit: usize,
        cursor: Option<&Cursor>,
        now: i64,
    ) -> Result<(Vec<Approval>, Option<Cursor>), ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_read().map_err(store_err)?;
        let t = tx.open_table(APPROVALS).map_err(store_err)?;
        let index =
            tx.open_table(if status == Some(Status::Pending) { PENDING } else { BY_TIME }).map_err(store_err)?;
        let range = match cursor {
            Some(c) => index.range(..(c.created_at, c.id.as_str())),
            None => index.range::<(u64, &str)>(..),
        }
        .map_err(store_err)?;
        let mut out = Vec::new();
        for item in range.rev() {
            let (k, _) = item.map_err(store_err)?;
            let (created_at, id) = k.value();
            let Some(v) = t.get(id).map_err(store_err)? else { continue };
            let mut a: Approval = serde_json::from_slice(v.value()).map_err(store_err)?;
            a.status = a.status_at(now);
            if status.is_none_or(|s| s == a.status) {
                out.push(a);
                if out.len() == limit {
                    return Ok((out, Some(Cursor { created_at, id: id.to_string() })));
                }
            }
        }
        Ok((out, None))
    }

    /// Pending approvals per agent, as stored (one pass over the pending index at start).
    pub(crate) fn pending_by_agent(&self) -> Result<std::collections::HashMap<String, usize>, ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_read().map_err(store_err)?;
        let t = tx.open_table(APPROVALS).map_err(store_err)?;
        let mut out = std::collections::HashMap::new();
        for item in tx.open_table(PENDING).map_err(store_err)?.iter().map_err(store_err)? {
            let (k, _) = item.map_err(store_err)?;
            if let Some(v) = t.get(k.value().1).map_err(store_err)? {
                let a: Approval = serde_json::from_slice(v.value()).map_err(store_err)?;
                *out.entry(a.agent).or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Moves an approval from `from` to `to` in one write transaction; no approving twice, no
    /// approving after expiry.
    pub(crate) fn transition(
        &self,
        id: &str,
        from: Status,
        to: Status,
        now: i64,
        edit: impl FnOnce(&mut Approval),
    ) -> Result<Approval, ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_write().map_err(store_err)?;
        let updated = transition_in(&tx, id, from, to, now, edit)?;
        tx.commit().map_err(store_err)?;
        Ok(updated)
    }

    /// Flips every stored pending approval past its expiry to expired, in one transaction, and
    /// returns them. Reads only the pending index.
    pub(crate) fn expire_overdue(&self, now: i64) -> Result<Vec<Approval>, ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_write().map_err(store_err)?;
        let mut expired = Vec::new();
        {
            let mut t = tx.open_table(APPROVALS).map_err(store_err)?;
            let mut pending = tx.open_table(PENDING).map_err(store_err)?;
            let mut due = Vec::new();
            for item in pending.iter().map_err(store_err)? {
                let (k, _) = item.map_err(store_err)?;
                if let Some(v) = t.get(k.value().1).map_err(store_err)? {
                    let a: Approval = serde_json::from_slice(v.value()).map_err(store_err)?;
                    if a.status == Status::Pending && a.expires_at <= now {
                        due.push(a);
                    }
                }
            }
            for mut a in due {
                pending.remove(a.time_key()).map_err(store_err)?;
                a.status = Status::Expired;
                let bytes = serde_json::to_vec(&a).map_err(store_err)?;
                t.insert(a.id.as_str(), bytes.as_slice()).map_err(store_err)?;
                expired.push(a);
            }
        }
        tx.commit().map_err(store_err)?;
        Ok(expired)
    }
}

/// Consumes approval `id` (approved → consumed) in the audit writer's transaction, so the
/// override is used in the same commit as the decision that accepts it; `Err` is the refusal's
/// reason code.
pub(crate) fn consume_in(tx: &redb::WriteTransaction, id: &str, now: i64) -> Result<(), String> {
    transition_in(tx, id, Status::Approved, Status::Consumed, now, |_| {}).map(|_| ()).map_err(|e| {
        match e {
            ApprovalError::NotPending { status: "consumed", .. } => Code::OverrideTokenAlreadyUsed,
            _ => Code::OverrideTokenInvalid,
        }
        .as_str()
        .to_string()
    })
}

/// `ApprovalStore::transition` inside a transaction someone else commits (the audit writer's:
/// an override is consumed in the same commit as the decision that accepts it). On error the
/// transaction is left as it was.
pub(crate) fn transition_in(
    tx: &redb::WriteTransaction,
    id: &str,
    from: Status,
    to: Status,
    now: i64,
    edit: impl FnOnce(&mut Approval),
) -> Result<Approval, ApprovalError> {
    let mut t = tx.open_table(APPROVALS).map_err(store_err)?;
    let mut a: Approval = match t.get(id).map_err(store_err)? {
        Some(v) => serde_json::from_slice(v.value()).map_err(store_err)?,
        None => return Err(ApprovalError::NotFound(id.to_string())),
    };
    let current = a.status_at(now);
    if current != from {
        return Err(ApprovalError::NotPending { id: id.to_string(), status: current.as_str() });
    }
    let was_pending = a.status == Status::Pending;
    a.status = to;
    edit(&mut a);
    let bytes = serde_json::to_vec(&a).map_err(store_err)?;
    if was_pending && to != Status::Pending {
        tx.open_table(PENDING).map_err(store_err)?.remove(a.time_key()).map_err(store_err)?;
    }
    t.insert(id, bytes.as_slice()).map_err(store_err)?;
    Ok(a)
}
