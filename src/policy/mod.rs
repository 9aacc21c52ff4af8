//! The decision engine: a pure function from what is known about a request (its classified
//! action and params, the agent's manifest and token claims) to ALLOW / DENY / ESCALATE with
//! reason codes (SPEC §8, steps 2–7). It never touches sockets, clocks or storage; budgets,
//! rate limits and overrides (steps 8–10) are applied by the caller around it, in that order.

mod params;

pub use params::{Params, extract_params};

use crate::config::{Connector, Manifest, Route};
use crate::identity::CapabilityClaims;
use rust_decimal::Decimal;
use serde::Serialize;
use std::sync::Arc;

/// The three outcomes of policy evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    Escalate,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Escalate => "escalate",
        }
    }
}

/// One reason code with a human message (never containing secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub code: &'static str,
    pub message: String,
}

impl Reason {
    pub fn new(code: &'static str, message: impl Into<String>) -> Reason {
        Reason { code, message: message.into() }
    }
}

/// A decision and the reasons that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reasons: Vec<Reason>,
}

impl Decision {
    pub fn deny(code: &'static str, message: impl Into<String>) -> Decision {
        Decision { verdict: Verdict::Deny, reasons: vec![Reason::new(code, message)] }
    }
    pub fn allow() -> Decision {
        Decision { verdict: Verdict::Allow, reasons: vec![Reason::new("all_checks_passed", "all checks passed")] }
    }
    pub fn escalate(reasons: Vec<Reason>) -> Decision {
        Decision { verdict: Verdict::Escalate, reasons }
    }
    /// The first reason's code.
    pub fn code(&self) -> &'static str {
        self.reasons.first().map_or("all_checks_passed", |r| r.code)
    }
}

/// The request as the engine sees it after classification.
#[derive(Debug)]
pub struct Action<'a> {
    pub connector: &'a Arc<Connector>,
    pub route: &'a Route,
    pub params: &'a Params,
}

/// Step 2 (after the host match and SSRF guard): may the agent use this connector at all?
pub fn check_connector(
    manifest: &Manifest,
    claims: Option<&CapabilityClaims>,
    connector: &Connector,
) -> Result<(), Decision> {
    if !manifest.policy.connectors.allows(&connector.name) {
        return Err(Decision::deny(
            "tool_not_allowed",
            format!("connector {} is not allowed for this agent", connector.name),
        ));
    }
    if let Some(list) = claims.and_then(|c| c.connectors.as_ref())
        && !list.iter().any(|c| c == &connector.name)
    {
        return Err(Decision::deny(
            "token_tool_not_allowed",
            format!("the capability token does not grant connector {}", connector.name),
        ));
    }
    if let Err(why) = &connector.credentials {
        // The reason names the missing source, never a secret; the connector must not be
        // reached unauthenticated.
        return Err(Decision::deny(
            "connector_unavailable",
            format!("connector {} is unavailable: {why}", connector.name),
        ));
    }
    Ok(())
}

fn money_above(amount: Decimal, limit: Decimal) -> bool {
    amount > limit
}

/// Steps 3–7 for a request whose connector passed `check_connector` and whose route matched.
pub fn evaluate(manifest: &Manifest, claims: Option<&CapabilityClaims>, action: &Action) -> Decision {
    let p = &manifest.policy;
    let act = action.route.action.as_str();
    // 3. action type
    if !p.action_types.allows(act) {
        return Decision::deny("action_type_not_allowed", format!("action {act} is not allowed for this agent"));
    }
    if let Some(list) = claims.and_then(|c| c.action_types.as_ref())
        && !list.iter().any(|a| a == act)
    {
        return Decision::deny(
            "token_action_type_not_allowed",
            format!("the capability token does not grant action {act}"),
        );
    }
    // 4. params: a declared amount must be readable (the extractor already failed closed).
    let params = action.params;
    if let Some(err) = &params.amount_error {
        return Decision::deny("amount_invalid", err.clone());
    }
    let amount = params.amount.map(|a| (a, params.currency.clone()));

    // 5. approval triggers (accumulate)
    let mut escalate = Vec::new();
    if p.approval.action_types.iter().any(|a| a == act) {
        escalate.push(Reason::new("requires_human_approval", format!("action {act} requires human approval")));
    }
    if p.approval.connectors.iter().any(|c| c == &action.connector.name) {
        escalate.push(Reason::new(
            "requires_human_approval",
            format!("connector {} requires human approval", action.connector.name),
        ));
    }
    if let Some((amt, Some(cur))) = &amount
        && let Some(limit) = p.approval.amount_above.get(cur)
        && money_above(*amt, *limit)
    {
        escalate.push(Reason::new(
            "amount_requires_approval",
            format!("amount {amt} {cur} is above the approval threshold {limit} {cur}"),
        ));
    }

    // 6. caps
    if let Some((amt, cur)) = &amount {
        if !p.amount_caps.is_empty() {
            match cur.as_ref().and_then(|c| p.amount_caps.get(c).map(|l| (c, l))) {
                None => {
                    let shown = cur.as_deref().unwrap_or("(none)");
                    return Decision::deny(
                        "currency_not_allowed",
                        format!("currency {shown} has no cap for this agent"),
                    );
                }
                Some((c, limit)) if money_above(*amt, *limit) => {
                    return Decision::deny(
                        "amount_exceeds_cap",
                        format!("amount {amt} {c} exceeds the cap {limit} {c}"),
                    );
                }
                Some(_) => {}
            }
        }
        if let Some(caps) = claims.and_then(|c| c.constraints.as_ref()).map(|c| &c.amount_max)
            && !caps.is_empty()
        {
            match cur.as_ref().and_then(|c| caps.get(c).map(|l| (c, l))) {
                Some((c, limit)) if money_above(*amt, *limit) => {
                    return Decision::deny(
                        "token_amount_exceeds_cap",
                        format!("amount {amt} {c} exceeds the token's cap {limit} {c}"),
                    );
                }
                Some(_) => {}
                None => {
                    let shown = cur.as_deref().unwrap_or("(none)");
                    return Decision::deny(
                        "token_amount_exceeds_cap",
                        format!("the capability token allows no amount in {shown}"),
                    );
                }
            }
        }
    }

    // 7. jurisdictions and counterparties: lists apply to routes that declare the param; a
    // declared param the request lacks is denied.
    let token_constraints = claims.and_then(|c| c.constraints.as_ref());
    if params.declares("jurisdiction") {
        let j = params.get("jurisdiction").map(str::to_ascii_uppercase);
        if !p.jurisdictions.is_empty() {
            match &j {
                None => return Decision::deny("jurisdiction_not_allowed", "the request names no jurisdiction"),
                Some(j) if !p.jurisdictions.allows(j) => {
                    return Decision::deny("jurisdiction_not_allowed", format!("jurisdiction {j} is not allowed"));
                }
                Some(_) => {}
            }
        }
        if let Some(list) = token_constraints.and_then(|c| c.jurisdictions.as_ref())
            && !j.as_ref().is_some_and(|j| list.iter().any(|l| l.eq_ignore_ascii_case(j)))
        {
            return Decision::deny(
                "token_jurisdiction_not_allowed",
                format!("the capability token does not allow jurisdiction {}", j.as_deref().unwrap_or("(none)")),
            );
        }
    }
    if params.declares("counterparty") {
        let cp = params.get("counterparty");
        let lists = &p.counterparties;
        match cp {
            None if !lists.is_empty() => {
                return Decision::deny("counterparty_not_in_allowlist", "the request names no counterparty");
            }
            Some(c) if lists.denies(c) => {
                return Decision::deny("counterparty_denied", format!("counterparty {c} is on the deny list"));
            }
            Some(c) if !lists.allows(c) => {
                return Decision::deny(
                    "counterparty_not_in_allowlist",
                    format!("counterparty {c} is not on the allow list"),
                );
            }
            _ => {}
        }
        if let Some(tc) = token_constraints.and_then(|c| c.counterparties.as_ref()) {
            let ok = cp.is_some_and(|c| {
                !tc.deny.iter().any(|d| d == c) && (tc.allow.is_empty() || tc.allow.iter().any(|a| a == c))
            });
            if !ok {
                return Decision::deny(
                    "token_counterparty_not_allowed",
                    format!("the capability token does not allow counterparty {}", cp.unwrap_or("(none)")),
                );
            }
        }
    }
    if escalate.is_empty() { Decision::allow() } else { Decision::escalate(escalate) }
}

#[cfg(test)]
mod tests;
