//! The one place the gateway reads the clock. `clippy.toml` disallows `SystemTime::now`,
//! `Instant::now` and `OffsetDateTime::now_utc` everywhere else, so every time-dependent rule
//! (budget windows, approval and override TTLs, token `exp`/`nbf`, refusal budgets, idle
//! deadlines) reads time from here.
//!
//! Unit tests move time forward with `advance` instead of sleeping. The offset is per thread
//! and exists only in the crate's own test build; a release build reads the system clock
//! directly.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[cfg(test)]
thread_local! {
    static OFFSET: std::cell::Cell<std::time::Duration> = const { std::cell::Cell::new(std::time::Duration::ZERO) };
}

#[cfg(test)]
fn offset() -> std::time::Duration {
    OFFSET.with(|o| o.get())
}

/// Moves this thread's clocks (wall and monotonic) forward by `by` (unit tests only).
#[cfg(test)]
pub(crate) fn advance(by: std::time::Duration) {
    OFFSET.with(|o| o.set(o.get() + by));
}

/// The wall clock.
#[allow(clippy::disallowed_methods)]
pub fn now() -> SystemTime {
    let t = SystemTime::now();
    #[cfg(test)]
    let t = t + offset();
    t
}

/// The monotonic clock, for deadlines and durations.
#[allow(clippy::disallowed_methods)]
pub fn instant() -> Instant {
    let t = Instant::now();
    #[cfg(test)]
    let t = t + offset();
    t
}

/// The time since `earlier` on the monotonic clock (zero if `earlier` is later).
pub fn since(earlier: Instant) -> std::time::Duration {
    instant().saturating_duration_since(earlier)
}

/// Seconds since the Unix epoch (0 before it).
pub fn now_unix() -> i64 {
    now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Nanoseconds since the Unix epoch (0 before it).
pub fn now_unix_nanos() -> u128 {
    now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// The wall clock as a UTC date-time.
pub fn now_utc() -> time::OffsetDateTime {
    time::OffsetDateTime::from(now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn advance_moves_both_clocks_on_this_thread_only() {
        let (wall, mono) = (now_unix(), instant());
        advance(Duration::from_secs(3600));
        assert!(now_unix() >= wall + 3600);
        assert!(instant().duration_since(mono) >= Duration::from_secs(3600));
        let other = std::thread::spawn(now_unix).join().unwrap();
        assert!(other < wall + 3600, "another thread keeps the real time");
    }
}
