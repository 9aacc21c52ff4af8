//! The end-to-end tests, one binary: each module starts real gateways (in-process on port 0, or
//! the built `uapk-gateway` binary as a child process) against real upstreams and drives them
//! with real clients. `support` is the harness they share.

// These tests time real processes and sockets; the clock rule (clippy.toml) is for the gateway.
#![allow(clippy::disallowed_methods)]

mod support;

mod abuse;
mod bodies;
mod crash;
mod decisions;
mod disk;
mod evidence;
mod fleet;
mod foundation;
mod hostile;
mod https;
mod large_log;
mod mcp;
mod operations;
mod operators;
mod params;
mod rate_limits_redis;
mod state;
mod telemetry;
mod transparent;
mod usage;
mod walkthrough;
