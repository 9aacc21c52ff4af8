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
//! conformance suite (`tests.rs`) runs the same cases against both.

pub mod postgres;
#[cfg(test)]
mod tests;

use crate::config::Manifest;
use crate::limits::{Ask, BudgetCheck, Budgets, Settlement};
use std::time::Duration;

/// Budget counters: in memory (embedded) or in the fleet's database. Cloning shares them.
#[derive(Clone)]
pub enum BudgetStore {
    Memory(Budgets),
    Postgres(postgres::PgBudgets),
}

impl BudgetStore {
    /// Checks every budget of `manifest` and holds the request under `ask.id` (see
    /// [`Budgets::reserve`]); `Err` when the shared store cannot answer (the request is
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

    /// `settle` from code that cannot wait (a response body's end): the fleet store settles in
    /// the background, retrying.
    pub fn settle_later(&self, id: &str, settlement: Settlement) {
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
    pub async fn expire_unforwarded(&self, max_age: Duration) -> usize {
        match self {
            BudgetStore::Memory(b) => b.expire_unforwarded(max_age),
            BudgetStore::Postgres(p) => p.expire_unforwarded(max_age).await,
        }
    }

    /// Requests holding a reservation on this gateway.
    pub fn held(&self) -> usize {
        match self {
            BudgetStore::Memory(b) => b.held(),
            BudgetStore::Postgres(p) => p.held(),
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
