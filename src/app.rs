//! The application state: what the data path (`proxy`) and the admin API (`admin`) share, built
//! once by `runtime` and held behind an `Arc`. Its fields are private; each side reads it through
//! the methods of its own view below, so neither depends on the other and neither holds the raw
//! database or the gateway's signing key (the key signs through `App::decide_approval`,
//! `App::mint_override` and `App::export_bundle` only).

use crate::approvals::{Approval, ApprovalError, Approvals, Decided};
use crate::audit::{AuditError, AuditHandle, ExportReport, LogReader};
use crate::config::{GatewayConfig, PolicySet};
use crate::identity::{OverrideClaims, OverrideError, TokenVerifier};
use crate::limits::RateLimiters;
use crate::limits::in_flight::InFlight;
use crate::limits::refusals::RefusalBudget;
use crate::metrics::Metrics;
use crate::proxy::{TokenFile, ssrf::Vetter, tls::LeafCache, upstream::UpstreamClient};
use crate::state::BudgetStore;
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use ed25519_dalek::SigningKey;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// Manifests plus one token verifier per agent (each with its own verified-token cache), swapped
/// as a whole on reload so in-flight requests finish under the policy they started with.
pub(crate) struct Policies {
    /// The loaded manifests.
    pub set: PolicySet,
    /// One verifier per agent id.
    pub verifiers: HashMap<String, TokenVerifier>,
}

impl Policies {
    /// Policies for `set`, each agent with a fresh verifier.
    pub(crate) fn new(set: PolicySet) -> Policies {
        let verifiers = set
            .manifests
            .iter()
            .map(|(id, m)| (id.clone(), TokenVerifier::new(crate::identity::token_policy_for(m))))
            .collect();
        Policies { set, verifiers }
    }
}

/// Everything a running gateway shares between its listeners (see the module documentation).
pub struct App {
    config: GatewayConfig,
    policies: ArcSwap<Policies>,
    audit: AuditHandle,
    log: LogReader,
    key: SigningKey,
    budgets: BudgetStore,
    fleet_db: Option<crate::state::postgres::Db>,
    rate_limits: RateLimiters,
    approvals: Approvals,
    client: UpstreamClient,
    vetter: Vetter,
    token_file: Option<TokenFile>,
    leaves: Option<LeafCache>,
    refusals: RefusalBudget,
    in_flight: InFlight,
    telemetry: Telemetry,
    metrics: Metrics,
    draining: AtomicBool,
    stopping: watch::Sender<bool>,
}

/// What `runtime` builds an [`App`] from.
pub(crate) struct Parts {
    pub(crate) config: GatewayConfig,
    pub(crate) policies: Policies,
    pub(crate) audit: AuditHandle,
    pub(crate) log: LogReader,
    pub(crate) key: SigningKey,
    pub(crate) budgets: BudgetStore,
    pub(crate) fleet_db: Option<crate::state::postgres::Db>,
    pub(crate) rate_limits: RateLimiters,
    pub(crate) approvals: Approvals,
    pub(crate) client: UpstreamClient,
    pub(crate) vetter: Vetter,
    pub(crate) token_file: Option<TokenFile>,
    pub(crate) leaves: Option<LeafCache>,
    pub(crate) refusals: RefusalBudget,
    pub(crate) in_flight: InFlight,
    pub(crate) telemetry: Telemetry,
    pub(crate) metrics: Metrics,
}

impl App {
    pub(crate) fn new(p: Parts) -> App {
        App {
            config: p.config,
            policies: ArcSwap::from_pointee(p.policies),
            audit: p.audit,
            log: p.log,
            key: p.key,
            budgets: p.budgets,
            fleet_db: p.fleet_db,
            rate_limits: p.rate_limits,
            approvals: p.approvals,
            client: p.client,
            vetter: p.vetter,
            token_file: p.token_file,
            leaves: p.leaves,
            refusals: p.refusals,
            in_flight: p.in_flight,
            telemetry: p.telemetry,
            metrics: p.metrics,
            draining: AtomicBool::new(false),
            stopping: watch::channel(false).0,
        }
    }

    /// Stopping: readiness turns false and held requests are answered 503.
    pub(crate) fn stop(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.stopping.send_replace(true);
    }
}

/// Shared by both sides.
impl App {
    /// The validated configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The current policies (swapped whole on reload).
    pub(crate) fn policies(&self) -> &ArcSwap<Policies> {
        &self.policies
    }

    /// The audit log (append, size, checkpoints).
    pub(crate) fn audit(&self) -> &AuditHandle {
        &self.audit
    }

    /// The approvals queue (local or the fleet's).
    pub fn approvals(&self) -> &Approvals {
        &self.approvals
    }

    pub(crate) fn rate_limits(&self) -> &RateLimiters {
        &self.rate_limits
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Changes to `true` when the gateway stops.
    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Reads the local log (the embedded log, or a fleet gateway's read copy).
    pub fn log(&self) -> &LogReader {
        &self.log
    }
}

/// The data path's view.
impl App {
    /// Budget counters (in memory, or the fleet's).
    pub fn budgets(&self) -> &BudgetStore {
        &self.budgets
    }

    pub(crate) fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// The SSRF guard (`allow_private_destinations`).
    pub fn vetter(&self) -> &Vetter {
        &self.vetter
    }

    pub(crate) fn token_file(&self) -> Option<&TokenFile> {
        self.token_file.as_ref()
    }

    /// Leaf certificates for intercepted tunnels (none without an interception CA).
    pub fn leaves(&self) -> Option<&LeafCache> {
        self.leaves.as_ref()
    }

    pub(crate) fn refusals(&self) -> &RefusalBudget {
        &self.refusals
    }

    /// Each identified agent's requests in flight.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    pub(crate) fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// An override token for an approved approval: the token and its `jti`.
    pub(crate) fn mint_override(&self, a: &Approval, now: i64) -> Result<(String, String), ApprovalError> {
        self.approvals.mint_override(&self.key, a, now)
    }

    /// Verifies an override token this gateway (or the fleet, sharing its key) signed.
    pub(crate) fn verify_override(&self, token: &str, now: i64) -> Result<OverrideClaims, OverrideError> {
        crate::identity::verify_override(token, &self.key.verifying_key(), now)
    }
}

/// The admin API's view.
impl App {
    /// Approves or denies a pending approval (signing its override token), and records it.
    pub(crate) async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        decided_by: &str,
        note: Option<String>,
        override_ttl: Duration,
    ) -> Result<Decided, ApprovalError> {
        self.approvals.decide(&self.audit, &self.key, id, approve, decided_by, note, override_ttl).await
    }

    /// Writes the signed export bundle of entries `[from, to)` of `snapshot` (a read of
    /// [`App::log`]) to `out` (blocking: call it off the runtime's threads).
    pub(crate) fn export_bundle(
        &self,
        snapshot: &redb::ReadTransaction,
        out: &Path,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<ExportReport, AuditError> {
        crate::audit::export_from(snapshot, out, from, to, &self.key)
    }

    /// The key id of the checkpoint signatures.
    pub(crate) fn key_id(&self) -> [u8; 4] {
        crate::audit::key_id(&self.config.audit.origin, &self.key.verifying_key())
    }

    /// Whether the fleet's database answers (always true when embedded).
    pub(crate) fn state_up(&self) -> bool {
        self.fleet_db.as_ref().is_none_or(|db| db.up())
    }

    /// The fleet's database, for the loops that follow it (`None` when embedded).
    pub(crate) fn fleet_db(&self) -> Option<&crate::state::postgres::Db> {
        self.fleet_db.as_ref()
    }

    /// Whether the gateway is draining (stopping).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
