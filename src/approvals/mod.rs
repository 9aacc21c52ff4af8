//! Escalations waiting for a human (SPEC §9). An ESCALATE decision creates a pending approval
//! (`appr-<24 hex>`) stored in the gateway's redb file, next to the audit tables, so it
//! survives restarts. Every state change is also written to the audit log by the caller.

use crate::audit::SharedDb;
use rand::RngCore;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    Expired,
    /// Approved and its override token used.
    Consumed,
}

impl Status {
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonRecord {
    pub code: String,
    pub message: String,
}

/// One approval as stored and as shown by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub id: String,
    pub agent: String,
    pub connector: String,
    pub action: String,
    pub params: BTreeMap<String, String>,
    pub method: String,
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: String,
    pub host: String,
    #[serde(default)]
    pub port: u16,
    pub path: String,
    #[serde(default)]
    pub query: Option<String>,
    /// The forwarded request headers the override is bound to (SPEC §14.7).
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
    /// SHA-256 (hex) and length of the request body the override is bound to.
    #[serde(default)]
    pub body_sha256: Option<String>,
    #[serde(default)]
    pub body_len: Option<u64>,
    /// SHA-256 (hex) of the canonical action (SPEC §6); an override is valid only for it.
    pub action_hash: String,
    pub reasons: Vec<ReasonRecord>,
    pub status: Status,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: i64,
    /// Index of the audit record of the escalated decision.
    pub record: u64,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub decided_by: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("approval store: {0}")]
    Store(String),
    #[error("approval {0} not found")]
    NotFound(String),
    #[error("approval {id} is {status}, not pending")]
    NotPending { id: String, status: &'static str },
}

fn store_err(e: impl std::fmt::Display) -> ApprovalError {
    ApprovalError::Store(e.to_string())
}

/// The approvals table in the gateway's database.
#[derive(Clone)]
pub struct ApprovalStore {
    db: SharedDb,
}

/// A new approval id: `appr-` and 24 random hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    format!("appr-{}", hex::encode(b))
}

impl ApprovalStore {
    pub fn open(db: SharedDb) -> Result<Self, ApprovalError> {
        let tx = db.get().map_err(store_err)?.begin_write().map_err(store_err)?;
        tx.open_table(APPROVALS).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(ApprovalStore { db })
    }

    pub fn put(&self, a: &Approval) -> Result<(), ApprovalError> {
        let bytes = serde_json::to_vec(a).map_err(store_err)?;
        let tx = self.db.get().map_err(store_err)?.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(APPROVALS).map_err(store_err)?;
            t.insert(a.id.as_str(), bytes.as_slice()).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    pub fn get(&self, id: &str) -> Result<Option<Approval>, ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_read().map_err(store_err)?;
        let t = tx.open_table(APPROVALS).map_err(store_err)?;
        match t.get(id).map_err(store_err)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(store_err),
            None => Ok(None),
        }
    }

    /// All approvals, optionally of one status, newest first; pending ones past their expiry
    /// are reported as expired.
    pub fn list(&self, status: Option<Status>, now: i64) -> Result<Vec<Approval>, ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_read().map_err(store_err)?;
        let t = tx.open_table(APPROVALS).map_err(store_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(store_err)? {
            let (_, v) = item.map_err(store_err)?;
            let mut a: Approval = serde_json::from_slice(v.value()).map_err(store_err)?;
            if a.status == Status::Pending && a.expires_at <= now {
                a.status = Status::Expired;
            }
            if status.is_none_or(|s| s == a.status) {
                out.push(a);
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Moves an approval from `from` to `to` in one write transaction; no approving twice, no
    /// approving after expiry.
    pub fn transition(
        &self,
        id: &str,
        from: Status,
        to: Status,
        now: i64,
        edit: impl FnOnce(&mut Approval),
    ) -> Result<Approval, ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_write().map_err(store_err)?;
        let updated = {
            let mut t = tx.open_table(APPROVALS).map_err(store_err)?;
            let mut a: Approval = match t.get(id).map_err(store_err)? {
                Some(v) => serde_json::from_slice(v.value()).map_err(store_err)?,
                None => return Err(ApprovalError::NotFound(id.to_string())),
            };
            let current = if a.status == Status::Pending && a.expires_at <= now { Status::Expired } else { a.status };
            if current != from {
                return Err(ApprovalError::NotPending { id: id.to_string(), status: current.as_str() });
            }
            a.status = to;
            edit(&mut a);
            let bytes = serde_json::to_vec(&a).map_err(store_err)?;
            t.insert(id, bytes.as_slice()).map_err(store_err)?;
            a
        };
        tx.commit().map_err(store_err)?;
        Ok(updated)
    }

    /// Flips every stored pending approval past its expiry to expired, in one transaction, and
    /// returns them.
    pub fn expire_overdue(&self, now: i64) -> Result<Vec<Approval>, ApprovalError> {
        let tx = self.db.get().map_err(store_err)?.begin_write().map_err(store_err)?;
        let mut expired = Vec::new();
        {
            let mut t = tx.open_table(APPROVALS).map_err(store_err)?;
            let mut due = Vec::new();
            for item in t.iter().map_err(store_err)? {
                let (_, v) = item.map_err(store_err)?;
                let a: Approval = serde_json::from_slice(v.value()).map_err(store_err)?;
                if a.status == Status::Pending && a.expires_at <= now {
                    due.push(a);
                }
            }
            for mut a in due {
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
