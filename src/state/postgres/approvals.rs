//! One approvals queue for a fleet (SPEC §15.3): every approval in `uapk_approvals`, so an
//! escalation made on one gateway is listed, approved or denied on any other; an agent's
//! `escalation.max_pending` counts its pending approvals across the fleet (a slot is taken in
//! `uapk_approval_slots` under the agent's lock before the escalation is recorded); an override
//! is consumed exactly once, in the transaction of the `decision` entry that accepts it
//! ([`consume_in`]).

use super::{CallError, Db, DbError, lock_key};
use crate::approvals::{Approval, ApprovalError, Cursor, Status};
use deadpool_postgres::GenericClient;
use std::sync::Arc;

/// The `NOTIFY` channel of decided approvals (payload: the approval id).
pub(crate) const CHANNEL: &str = "uapk_approvals";

/// A slot taken for longer than this without its approval being stored is free again (its
/// gateway died between the two).
const SLOT_MAX_AGE: i64 = 120;

#[derive(Clone)]
pub(crate) struct PgApprovals {
    db: Db,
    origin: Arc<str>,
}

fn store_err(e: DbError) -> ApprovalError {
    ApprovalError::Store(e)
}

fn parse(body: &str) -> Result<Approval, CallError> {
    serde_json::from_str(body).map_err(|e| CallError::Bad(format!("an approval in the database is unreadable: {e}")))
}

fn status_of(s: &str) -> Status {
    match s {
        "pending" => Status::Pending,
        "approved" => Status::Approved,
        "denied" => Status::Denied,
        "expired" => Status::Expired,
        _ => Status::Consumed,
    }
}

/// Consumes approval `id` (approved → consumed) in the caller's transaction; `Err` is the
/// refusal's reason code when it is not approved (any more).
pub(super) async fn consume_in<C: GenericClient>(
    c: &C,
    origin: &str,
    id: &str,
    now: i64,
) -> Result<Result<(), String>, CallError> {
    let row = c
        .query_opt("SELECT status, body FROM uapk_approvals WHERE origin = $1 AND id = $2 FOR UPDATE", &[&origin, &id])
        .await?;
    let Some(row) = row else { return Ok(Err("override_token_invalid".into())) };
    let mut a = parse(row.get::<_, &str>(1))?;
    match a.status_at(now) {
        Status::Approved => {}
        Status::Consumed => return Ok(Err("override_token_already_used".into())),
        _ => return Ok(Err("override_token_invalid".into())),
    }
    a.status = Status::Consumed;
    let body = serde_json::to_string(&a).unwrap_or_default();
    c.execute(
        "UPDATE uapk_approvals SET status = 'consumed', body = $3 WHERE origin = $1 AND id = $2",
        &[&origin, &id, &body],
    )
    .await?;
    Ok(Ok(()))
}

impl PgApprovals {
    pub(crate) fn new(db: Db, origin: &str) -> PgApprovals {
        PgApprovals { db, origin: origin.into() }
    }

    /// Takes one of `agent`'s `max_pending` slots across the fleet: `Ok(Ok(slot))`, or
    /// `Ok(Err(pending))` when the agent has that many pending already.
    pub(crate) async fn reserve(
        &self,
        agent: &str,
        max_pending: usize,
    ) -> Result<Result<String, usize>, ApprovalError> {
        let (origin, agent) = (self.origin.clone(), agent.to_string());
        let slot = crate::approvals::new_id();
        self.db
            .call("approval_reserve", move |mut c| async move {
                let tx = c.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&["approvals", &origin, &agent])]).await?;
                let now: i64 =
                    tx.query_one("SELECT floor(extract(epoch FROM clock_timestamp()))::bigint", &[]).await?.get(0);
                let pending: i64 = tx
                    .query_one(
                        "SELECT (SELECT count(*) FROM uapk_approvals
                                  WHERE origin = $1 AND agent = $2 AND status = 'pending' AND expires_at > $3)
                              + (SELECT count(*) FROM uapk_approval_slots
                                  WHERE origin = $1 AND agent = $2 AND since > $4)",
                        &[&&*origin, &agent, &now, &(now - SLOT_MAX_AGE)],
                    )
                    .await?
                    .get(0);
                if pending as usize >= max_pending {
                    tx.commit().await?;
                    return Ok(Err(pending as usize));
                }
                tx.execute(
                    "INSERT INTO uapk_approval_slots (origin, slot, agent, since) VALUES ($1, $2, $3, $4)",
                    &[&&*origin, &slot, &agent, &now],
                )
                .await?;
                tx.commit().await?;
                Ok(Ok(slot))
            })
            .await
            .map_err(store_err)
    }

    pub(crate) async fn unreserve(&self, slot: &str) {
        let (origin, slot) = (self.origin.clone(), slot.to_string());
        let _ = self
            .db
            .call("approval_reserve", move |c| async move {
                Ok(c.execute("DELETE FROM uapk_approval_slots WHERE origin = $1 AND slot = $2", &[&&*origin, &slot])
                    .await?)
            })
            .await;
    }

    /// Stores a new approval in the slot `reserve` took.
    pub(crate) async fn put(&self, a: &Approval, slot: Option<String>) -> Result<(), ApprovalError> {
        let origin = self.origin.clone();
        let body = serde_json::to_string(a).map_err(|e| ApprovalError::Store(e.to_string()))?;
        let (id, agent, status, created, expires) =
            (a.id.clone(), a.agent.clone(), a.status.as_str(), a.created_at, a.expires_at);
        self.db
            .call("approval_put", move |mut c| async move {
                let tx = c.transaction().await?;
                if let Some(slot) = &slot {
                    tx.execute("DELETE FROM uapk_approval_slots WHERE origin = $1 AND slot = $2", &[&&*origin, slot])
                        .await?;
                }
                tx.execute(
                    "INSERT INTO uapk_approvals (origin, id, agent, status, created_at, expires_at, body)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (id) DO UPDATE SET status = $4, body = $7",
                    &[&&*origin, &id, &agent, &status, &created, &expires, &body],
                )
                .await?;
                Ok(tx.commit().await?)
            })
            .await
            .map_err(store_err)
    }

    pub(crate) async fn get(&self, id: &str) -> Result<Option<Approval>, ApprovalError> {
        let (origin, id) = (self.origin.clone(), id.to_string());
        self.db
            .call("approval_get", move |c| async move {
                match c
                    .query_opt("SELECT body FROM uapk_approvals WHERE origin = $1 AND id = $2", &[&&*origin, &id])
                    .await?
                {
                    Some(r) => parse(r.get::<_, &str>(0)).map(Some),
                    None => Ok(None),
                }
            })
            .await
            .map_err(store_err)
    }

    /// One page, newest first (see `ApprovalStore::page`).
    pub(crate) async fn page(
        &self,
        status: Option<Status>,
        limit: usize,
        cursor: Option<Cursor>,
        now: i64,
    ) -> Result<(Vec<Approval>, Option<Cursor>), ApprovalError> {
        let origin = self.origin.clone();
        let (c_at, c_id) = cursor.map_or((i64::MAX, String::from("\u{10FFFF}")), |c| (c.created_at as i64, c.id));
        let want = limit as i64 + 1;
        let rows = self
            .db
            .call("approval_page", move |c| async move {
                // Status as of now: pending past its expiry is expired.
                const HEAD: &str = "SELECT body FROM uapk_approvals WHERE origin = $1 AND (created_at, id) < ($2, $3)";
                const TAIL: &str = "ORDER BY created_at DESC, id DESC";
                let o: &str = &origin;
                let rows = match status {
                    None => c.query(&format!("{HEAD} {TAIL} LIMIT $4"), &[&o, &c_at, &c_id, &want]).await?,
                    Some(Status::Pending) => {
                        let sql = format!("{HEAD} AND status = 'pending' AND expires_at > $4 {TAIL} LIMIT $5");
                        c.query(&sql, &[&o, &c_at, &c_id, &now, &want]).await?
                    }
                    Some(Status::Expired) => {
                        let sql = format!(
                            "{HEAD} AND (status = 'expired' OR (status = 'pending' AND expires_at <= $4)) {TAIL} LIMIT $5"
                        );
                        c.query(&sql, &[&o, &c_at, &c_id, &now, &want]).await?
                    }
                    Some(st) => {
                        let sql = format!("{HEAD} AND status = $4 {TAIL} LIMIT $5");
                        c.query(&sql, &[&o, &c_at, &c_id, &st.as_str(), &want]).await?
                    }
                };
                rows.iter().map(|r| parse(r.get::<_, &str>(0))).collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(store_err)?;
        let mut out: Vec<Approval> = rows
            .into_iter()
            .map(|mut a| {
                a.status = a.status_at(now);
                a
            })
            .collect();
        let next = if out.len() > limit {
            out.truncate(limit);
            out.last().map(|a| Cursor { created_at: a.created_at.max(0) as u64, id: a.id.clone() })
        } else {
            None
        };
        Ok((out, next))
    }

    /// Moves one approval between states (see `ApprovalStore::transition`), fleet-wide.
    pub(crate) async fn transition(
        &self,
        id: &str,
        from: Status,
        to: Status,
        now: i64,
        edit: impl FnOnce(&mut Approval) + Send + 'static,
    ) -> Result<Approval, ApprovalError> {
        let (origin, id2) = (self.origin.clone(), id.to_string());
        self.db
            .call("approval_transition", move |mut c| async move {
                let tx = c.transaction().await?;
                let row = tx
                    .query_opt(
                        "SELECT body FROM uapk_approvals WHERE origin = $1 AND id = $2 FOR UPDATE",
                        &[&&*origin, &id2],
                    )
                    .await?;
                let Some(row) = row else { return Ok(Err(ApprovalError::NotFound(id2))) };
                let mut a = parse(row.get::<_, &str>(0))?;
                let current = a.status_at(now);
                if current != from {
                    return Ok(Err(ApprovalError::NotPending { id: id2, status: current.as_str() }));
                }
                a.status = to;
                edit(&mut a);
                let body = serde_json::to_string(&a).unwrap_or_default();
                tx.execute(
                    "UPDATE uapk_approvals SET status = $3, body = $4 WHERE origin = $1 AND id = $2",
                    &[&&*origin, &id2, &to.as_str(), &body],
                )
                .await?;
                // Held requests on other gateways wake on it (delivered at commit).
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &id2]).await?;
                tx.commit().await?;
                Ok(Ok(a))
            })
            .await
            .map_err(store_err)?
    }

    /// Expires the fleet's pending approvals past their expiry; returns those this call
    /// expired (another gateway's sweep gets the others: each is recorded once).
    pub(crate) async fn expire_overdue(&self, now: i64) -> Result<Vec<Approval>, ApprovalError> {
        let origin = self.origin.clone();
        self.db
            .call("approval_expire", move |mut c| async move {
                let tx = c.transaction().await?;
                let rows = tx
                    .query(
                        "SELECT id, body FROM uapk_approvals WHERE origin = $1 AND status = 'pending' AND expires_at <= $2
                         FOR UPDATE SKIP LOCKED LIMIT 1000",
                        &[&&*origin, &now],
                    )
                    .await?;
                let mut out = Vec::new();
                for r in rows {
                    let id: String = r.get(0);
                    let mut a = parse(r.get::<_, &str>(1))?;
                    a.status = Status::Expired;
                    let body = serde_json::to_string(&a).unwrap_or_default();
                    tx.execute(
                        "UPDATE uapk_approvals SET status = 'expired', body = $3 WHERE origin = $1 AND id = $2",
                        &[&&*origin, &id, &body],
                    )
                    .await?;
                    out.push(a);
                }
                tx.commit().await?;
                Ok(out)
            })
            .await
            .map_err(store_err)
    }

    /// Pending approvals of the fleet (the `uapk_approvals_pending` gauge).
    pub(crate) async fn pending_total(&self, now: i64) -> Result<u64, ApprovalError> {
        let origin = self.origin.clone();
        self.db
            .call("approval_count", move |c| async move {
                let n: i64 = c
                    .query_one(
                        "SELECT count(*) FROM uapk_approvals WHERE origin = $1 AND status = 'pending' AND expires_at > $2",
                        &[&&*origin, &now],
                    )
                    .await?
                    .get(0);
                Ok(n.max(0) as u64)
            })
            .await
            .map_err(store_err)
    }

    /// The current status of each of `ids` that is no longer pending (held requests wake on it).
    pub(crate) async fn decided(&self, ids: Vec<String>) -> Result<Vec<(String, Status)>, ApprovalError> {
        let origin = self.origin.clone();
        self.db
            .call("approval_poll", move |c| async move {
                let rows = c
                    .query(
                        "SELECT id, status FROM uapk_approvals WHERE origin = $1 AND id = ANY($2) AND status <> 'pending'",
                        &[&&*origin, &ids],
                    )
                    .await?;
                Ok(rows.iter().map(|r| (r.get::<_, String>(0), status_of(r.get::<_, &str>(1)))).collect())
            })
            .await
            .map_err(store_err)
    }
}
