//! UAPK Gateway: the egress firewall and black-box recorder for AI agents.
//!
//! Request flow (see `proxy::handle`): accept → (TLS) → parse → identify (`identity`) →
//! classify (connector, route, action, params) → decide (`policy`) → reserve (`limits`) →
//! audit `decision`, awaited durable (`audit`) → inject credentials → forward → audit
//! `outcome` → respond.
//!
//! `audit` depends on nothing else in this crate, so `verify` links only the log's logic.

pub(crate) mod admin;
pub mod app;
pub mod approvals;
pub mod audit;
pub mod clock;
pub mod config;
pub mod identity;
pub mod limits;
pub(crate) mod metrics;
pub mod policy;
pub mod proxy;
pub(crate) mod response;
pub mod runtime;
pub mod state;
pub(crate) mod telemetry;
pub mod usage;
