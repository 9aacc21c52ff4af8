//! UAPK Gateway: the egress firewall and black-box recorder for AI agents.
//!
//! Request flow (see `proxy::handle`): accept → (TLS) → parse → identify (`identity`) →
//! classify (connector, route, action, params) → decide (`policy`) → reserve (`limits`) →
//! audit `decision`, awaited durable (`audit`) → inject credentials → forward → audit
//! `outcome` → respond.
//!
//! `audit` depends on nothing else in this crate, so `verify` links only the log's logic.

pub mod approvals;
pub mod audit;
pub mod config;
pub mod identity;
// pub mod limits; (re-enabled once identity/audit land)
// pub mod policy; (re-enabled once identity/audit land)
// pub mod proxy; (re-enabled once identity/audit land)
// pub mod runtime; (re-enabled once identity/audit land)
// pub mod admin; (re-enabled once identity/audit land)
