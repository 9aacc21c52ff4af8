//! Requests in flight per agent (`limits.max_in_flight_per_agent`, SPEC §16.3): one agent's slow
//! requests (trickling uploads, held responses) must not take every connection the gateway has.
//!
//! A request takes a slot once its agent is identified and gives it back when the slot is
//! dropped: with the response body, when it ends or the client goes away, or with the request
//! if it stops earlier. This is process-local bookkeeping of live requests (each gateway of a
//! fleet counts its own connections), so a guard that gives back on drop is the right shape: it
//! cannot leak on any path, an early return or a panic included.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The per-agent counters.
#[derive(Debug)]
pub struct InFlight {
    max: usize,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// One request's place under its agent's cap, given back when dropped.
#[derive(Debug)]
pub(crate) struct InFlightSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    agent: String,
}

impl InFlight {
    /// `max` requests in flight per agent (at least one).
    pub(crate) fn new(max: usize) -> InFlight {
        InFlight { max: max.max(1), counts: Arc::default() }
    }

    /// The cap applied.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more of `agent`'s requests, or `None` when it already has `max` in flight.
    pub(crate) fn try_take(&self, agent: &str) -> Option<InFlightSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match counts.get_mut(agent) {
            Some(n) if *n >= self.max => return None,
            Some(n) => *n += 1,
            None => {
                counts.insert(agent.to_string(), 1);
            }
        }
        Some(InFlightSlot { counts: self.counts.clone(), agent: agent.to_string() })
    }

    /// `agent`'s requests in flight now.
    pub fn in_flight(&self, agent: &str) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(agent).copied().unwrap_or(0)
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        // An agent with nothing in flight takes no memory.
        if let Some(n) = counts.get_mut(&self.agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.agent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_agent_has_its_own_cap_and_slots_come_back_when_dropped() {
        let f = InFlight::new(2);
        let a1 = f.try_take("a").unwrap();
        let a2 = f.try_take("a").unwrap();
        assert!(f.try_take("a").is_none(), "beyond the cap");
        let b = f.try_take("b").expect("another agent is still served");
        assert_eq!((f.in_flight("a"), f.in_flight("b")), (2, 1));
        drop(a1);
        let a3 = f.try_take("a").expect("a slot came back");
        drop((a2, a3, b));
        assert_eq!((f.in_flight("a"), f.in_flight("b")), (0, 0));
        assert!(f.counts.lock().unwrap().is_empty(), "nothing kept for idle agents");
        assert_eq!(InFlight::new(0).max(), 1);
    }
}
