//! Budgets (SPEC §8 step 8) and rate limits (step 9).
//!
//! Budgets live in [`budgets`]: the rules of what counts and when a request is admitted, and a
//! reservation that every path of the data path settles explicitly, by request id.
//!
//! Rate limits are GCRA buckets checked all before any is taken ([`RateLimiters::check`]): per
//! gateway on the governor crate ([`rate`]), or for a fleet in Redis ([`rate_redis`]).
//! How fast one agent's refusals are recorded is bounded by [`refusals`].

pub mod budgets;
pub mod in_flight;
pub mod rate;
pub mod rate_redis;
pub mod refusals;

pub use budgets::{
    Ask, BudgetCheck, Budgets, Counted, Reservation, Settlement, Spend, TokenUse, Used, admit, counts_toward_budgets,
    recorded_spend, token_charge, usage_tokens,
};

pub use rate::{LocalLimiters, RateLimited, RateLimiters, RateRefused, RateTaken};

#[cfg(test)]
mod test_support;
