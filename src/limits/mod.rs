//! Budgets (SPEC §8 step 8) and rate limits (step 9).
//!
//! Budgets live in `budgets`: the rules of what counts and when a request is admitted, and a
//! reservation that every path of the data path settles explicitly, by request id.
//!
//! Rate limits are GCRA buckets checked all before any is taken (`RateLimiters::check`): per
//! gateway on the governor crate (`rate`), or for a fleet in Redis (`rate_redis`).
//! How fast one agent's refusals are recorded is bounded by [`refusals`].

pub(crate) mod budgets;
pub(crate) mod in_flight;
pub(crate) mod rate;
pub(crate) mod rate_redis;
pub mod refusals;

pub use budgets::{Ask, BudgetCheck, Budgets, Settlement, Spend};
pub(crate) use budgets::{
    Counted, Reservation, TokenUse, Used, admit, counts_toward_budgets, recorded_spend, token_charge,
};

pub(crate) use rate::{RateLimiters, RateRefused, RateTaken};

#[cfg(test)]
mod test_support;
