//! Escalations on the wire (SPEC §7, §9): `reject` answers 403 with the approval id; `hold`
//! parks the request (a future, not a thread) until a human decides, the hold times out, or the
//! gateway shuts down. The approvals themselves live in `crate::approvals`.

use super::{Facts, Gateway};
use crate::approvals::Resolution;
use std::time::Duration;

/// Waits for the human decision on a held request.
pub(super) async fn hold(gw: &Gateway, facts: &Facts, id: &str, timeout: Duration) -> Resolution {
    let rx = gw.approvals.hold(id);
    let mut stopping = gw.stopping.subscribe();
    let r = tokio::select! {
        r = rx => r.unwrap_or(Resolution::ShuttingDown),
        _ = tokio::time::sleep(timeout) => Resolution::TimedOut,
        _ = stopping.wait_for(|s| *s) => Resolution::ShuttingDown,
    };
    gw.approvals.release_hold(id);
    if r == Resolution::TimedOut {
        return gw.approvals.expire_held(&gw.audit, id, facts.agent.as_deref()).await;
    }
    r
}
