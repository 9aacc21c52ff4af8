//! UAPK Gateway: the egress firewall and black-box recorder for AI agents.
//!
//! Request flow (see `proxy::handle`): accept → (TLS) → parse → identify (`identity`) →
//! classify (connector, route, action, params) → decide (`policy`) → reserve (`limits`) →
//! audit `decision`, awaited durable (`audit`) → inject credentials → forward → audit
//! `outcome` → respond.
//!
//! `audit` depends on nothing else in this crate, so `verify` links only the log's logic.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod approvals;
pub mod audit;
pub mod clock;
pub mod config;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod response;
pub mod runtime;
pub mod state;
pub mod telemetry;
pub mod usage;
