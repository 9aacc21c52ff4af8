//! The state seam (SPEC §15): everything that must outlive a request — the log, budget
//! counters, approvals and override tokens — through one module with two backends, picked once
//! from `state.backend` and handed to the data path, which never knows which it has:
//! - **embedded** (the default, one gateway): the redb file at `audit.path` (`crate::audit`'s
//!   writer, `crate::approvals`' tables) and budget counters in memory, rebuilt from the log;
//! - **postgres** (a fleet): one log per `audit.origin` appended by every gateway, budgets
//!   reserved atomically across the fleet, one approvals queue (`postgres`).
//!
//! The operations are the same for both: append with a precondition (`audit::Precondition`),
//! reserve and settle by request id (`BudgetStore`), store, list and move approvals. The
//! conformance suite (`tests/it/state.rs`) runs the same cases against both.

pub mod postgres;

use crate::approvals::{ApprovalStore, Approvals};
use crate::audit::{self, AuditConfig, AuditLog};
use crate::config::{GatewayConfig, Manifest, StateBackend};
use crate::limits::{Ask, BudgetCheck, Budgets, Settlement};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// A backend opened for a gateway: its log, budget counters and approvals queue.
pub struct Opened {
    /// The log this gateway appends to: its own redb file or the fleet's log.
    pub log: Log,
    /// The budget counters: in memory (embedded) or in the fleet's database.
    pub budgets: BudgetStore,
    /// The approvals queue: in the redb file (embedded) or in the fleet's database.
    pub approvals: Approvals,
    /// Embedded: how many counted actions the counters were rebuilt from (`startup` entry).
    pub replayed: Option<u64>,
    /// The fleet's database (readiness, the background loops).
    pub fleet_db: Option<postgres::Db>,
}

/// Opens the backend `cfg.state` names: embedded (the redb file, counters rebuilt from its
/// log) or the fleet's PostgreSQL (schema migrated under an advisory lock, the log re-verified,
/// this gateway's key checked against the log's active key).
pub async fn open(
    cfg: &GatewayConfig,
    audit_cfg: AuditConfig,
    key: ed25519_dalek::SigningKey,
    metrics: Arc<crate::metrics::StateMetrics>,
) -> Result<Opened, String> {
    match &cfg.state {
        StateBackend::Embedded => {
            let consume: audit::Checker = Arc::new(|tx, p: &audit::Precondition| match &p.consume_approval {
                None => Ok(()),
                Some((id, now)) => crate::approvals::consume_in(tx, id, *now),
            });
            let path = audit_cfg.path.clone();
            let log = AuditLog::open_with(audit_cfg, key, consume)
                .map_err(|e| format!("audit log {}: {e}", path.display()))?;
            let db = log.database();
            let budgets = Budgets::new();
            let replayed = rebuild_budgets(&*db.get().map_err(|e| e.to_string())?, &budgets)?;
            let approvals = ApprovalStore::open(db).and_then(Approvals::new).map_err(|e| e.to_string())?;
            Ok(Opened {
                log: Log::Embedded(log),
                budgets: BudgetStore::Memory(budgets),
                approvals,
                replayed: Some(replayed),
                fleet_db: None,
            })
        }
        StateBackend::Postgres(pg) => {
            metrics.set_up("postgres", true);
            let db = postgres::Db::new(pg)?.with_observer(Arc::new(move |op, secs, ok| {
                metrics.observe("postgres", op, secs);
                metrics.set_up("postgres", ok);
            }));
            migrate_at_start(&db).await?;
            let origin = audit_cfg.origin.clone();
            let log = postgres::FleetLog::open(db.clone(), audit_cfg, key, &gateway_name()).await?;
            Ok(Opened {
                log: Log::Fleet(log),
                budgets: BudgetStore::Postgres(postgres::PgBudgets::new(db.clone(), &origin)),
                approvals: Approvals::fleet(postgres::PgApprovals::new(db.clone(), &origin)),
                replayed: None,
                fleet_db: Some(db),
            })
        }
    }
}

/// The log this gateway appends to: its own file, or the fleet's in PostgreSQL.
pub enum Log {
    /// `state.backend: embedded`: this gateway's own redb file at `audit.path`.
    Embedded(AuditLog),
    /// `state.backend: postgres`: the log of `audit.origin` in PostgreSQL, appended by every
    /// gateway of the fleet.
    Fleet(postgres::FleetLog),
}

impl Log {
    /// Appends and reads the log's state (size, checkpoints).
    pub fn handle(&self) -> audit::AuditHandle {
        match self {
            Log::Embedded(l) => l.handle(),
            Log::Fleet(l) => l.handle(),
        }
    }

    /// Reads the local log: the embedded file, or a fleet gateway's read copy.
    pub fn reader(&self) -> audit::LogReader {
        audit::LogReader::new(match self {
            Log::Embedded(l) => l.database(),
            Log::Fleet(l) => l.database(),
        })
    }

    /// Commits everything queued and stops the writer.
    pub async fn shutdown(self) {
        match self {
            Log::Embedded(l) => {
                let _ = tokio::task::spawn_blocking(move || l.shutdown()).await;
            }
            Log::Fleet(l) => l.shutdown().await,
        }
    }
}

/// The name entries of a fleet carry in `gateway` (SPEC §15.2): `HOSTNAME` (the pod name in
/// Kubernetes), else the host name.
pub fn gateway_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Creates or upgrades the fleet's schema; gateways starting together wait for each other's
/// migration (the advisory lock's wait is bounded by `statement_timeout`, so retried).
async fn migrate_at_start(db: &postgres::Db) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..20 {
        match postgres::migrate(db).await {
            Ok(applied) => {
                if !applied.is_empty() {
                    tracing::info!(versions = ?applied, "database schema migrated");
                }
                return Ok(());
            }
            Err(e) => {
                last = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Err(format!("migrating the database schema: {last}"))
}

/// Rebuilds budget counters from the committed decisions of the current UTC day that count
/// (`limits::counts_toward_budgets`).
fn rebuild_budgets(db: &redb::Database, budgets: &Budgets) -> Result<u64, String> {
    let now = crate::clock::now_unix();
    let day = now - now.rem_euclid(86_400);
    let since = time::OffsetDateTime::from_unix_timestamp(day)
        .map_err(|e| e.to_string())?
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())?;
    let Some(mut from) = crate::audit::first_index_at_or_after(db, &since).map_err(|e| e.to_string())? else {
        return Ok(0);
    };
    let mut counted = 0;
    loop {
        let batch = crate::audit::read_entries(db, from, 4096).map_err(|e| e.to_string())?;
        let Some(last) = batch.last().map(|(i, _)| *i) else { break };
        for (_, bytes) in &batch {
            let Ok(v) = serde_json::from_slice::<Value>(bytes) else { continue };
            // The same rule as at runtime: what counts is decided in one place.
            if let Some(spend) = crate::limits::recorded_spend(&v, now) {
                // `budget_actions_replayed` counts actions; token usage is replayed alongside.
                counted += u64::from(matches!(spend, crate::limits::Counted::Action(_)));
                budgets.record(&spend);
            }
        }
        from = last + 1;
    }
    Ok(counted)
}

/// Budget counters: in memory (embedded) or in the fleet's database. Cloning shares them.
#[derive(Clone)]
pub enum BudgetStore {
    /// `state.backend: embedded`: in this gateway's memory, rebuilt from its log at start.
    Memory(Budgets),
    /// `state.backend: postgres`: in the fleet's PostgreSQL database, reserved atomically across
    /// its gateways.
    Postgres(postgres::PgBudgets),
}

impl BudgetStore {
    /// Checks every budget of `manifest` and holds the request under `ask.id` (see
    /// `Budgets::reserve`); `Err` when the shared store cannot answer (the request is
    /// refused `audit_unavailable`: nothing is forwarded that the fleet did not count).
    pub async fn reserve(&self, manifest: &Manifest, ask: Ask) -> Result<BudgetCheck, String> {
        match self {
            BudgetStore::Memory(b) => Ok(b.reserve(manifest, ask)),
            BudgetStore::Postgres(p) => p.reserve(manifest, ask).await,
        }
    }

    /// Ends what request `id` holds (see [`Settlement`]), waiting until the store has it. In
    /// the fleet store `Forwarded` is kept in the decision's own commit
    /// (`audit::Precondition::keep_budget`), so settling it again changes nothing.
    pub async fn settle(&self, id: &str, settlement: Settlement) {
        match self {
            BudgetStore::Memory(b) => b.settle(id, settlement),
            BudgetStore::Postgres(p) => p.settle(id, settlement).await,
        }
    }

    /// Gives back what a request that stops before it is forwarded holds (`Settlement::Release`);
    /// a fleet reservation that was never stored (no budget) needs no call.
    pub(crate) async fn release(&self, r: crate::limits::Reservation) {
        match self {
            BudgetStore::Memory(b) => b.settle(r.id(), Settlement::Release),
            BudgetStore::Postgres(p) if r.shared() => p.settle(r.id(), Settlement::Release).await,
            BudgetStore::Postgres(_) => {}
        }
    }

    /// `settle` from code that cannot wait (a response body's end): the fleet store settles in
    /// the background, retrying.
    pub(crate) fn settle_later(&self, id: &str, settlement: Settlement) {
        match self {
            BudgetStore::Memory(b) => b.settle(id, settlement),
            BudgetStore::Postgres(p) => {
                let (p, id) = (p.clone(), id.to_string());
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => drop(rt.spawn(async move { p.settle(&id, settlement).await })),
                    Err(_) => tracing::error!(request_id = %id, "budget settlement lost: no runtime"),
                }
            }
        }
    }

    /// Releases reservations never forwarded nor released after `max_age` (see
    /// [`Budgets::expire_unforwarded`]); the fleet store does it for the whole fleet.
    pub(crate) async fn expire_unforwarded(&self, max_age: Duration) -> usize {
        match self {
            BudgetStore::Memory(b) => b.expire_unforwarded(max_age),
            BudgetStore::Postgres(p) => p.expire_unforwarded(max_age).await,
        }
    }

    /// The in-memory counters (embedded only): what the rebuild from the log fills.
    pub fn memory(&self) -> Option<&Budgets> {
        match self {
            BudgetStore::Memory(b) => Some(b),
            BudgetStore::Postgres(_) => None,
        }
    }
}
