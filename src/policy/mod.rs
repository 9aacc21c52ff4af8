//! The decision engine: a pure function from what is known about a request (its classified
//! action and params, the agent's manifest and token claims) to ALLOW / DENY / ESCALATE with
//! reason codes (SPEC §8, steps 2–7). It never touches sockets, clocks or storage; budgets,
//! rate limits and overrides (steps 8–10) are applied by the caller around it, in that order.

mod code;
mod params;

pub(crate) use code::{At, Code};
pub use params::extract_params;
pub(crate) use params::{JsonDoc, Params, check_body_media_type, check_media_type};

use crate::config::{AllowDeny, Connector, Manifest};
use crate::identity::CapabilityClaims;
use rust_decimal::Decimal;
use serde::Serialize;
use std::sync::Arc;

/// The three outcomes of policy evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Verdict {
    Allow,
    Deny,
    Escalate,
}

impl Verdict {
    pub(crate) fn as_str(self) -> &'static str {
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
    /// The reason code, e.g. `counterparty_denied`.
    pub code: Code,
    /// Why, in words for a human (never a secret).
    pub message: String,
}

impl Reason {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Reason {
        Reason { code, message: message.into() }
    }
}

/// A decision and the reasons that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub verdict: Verdict,
    pub reasons: Vec<Reason>,
}

impl Decision {
    pub(crate) fn deny(code: Code, message: impl Into<String>) -> Decision {
        Decision { verdict: Verdict::Deny, reasons: vec![Reason::new(code, message)] }
    }
    pub(crate) fn allow() -> Decision {
        Decision { verdict: Verdict::Allow, reasons: vec![Reason::new(Code::AllChecksPassed, "all checks passed")] }
    }
    pub(crate) fn escalate(reasons: Vec<Reason>) -> Decision {
        Decision { verdict: Verdict::Escalate, reasons }
    }
    /// The first reason's code.
    pub(crate) fn code(&self) -> Code {
        self.reasons.first().map_or(Code::AllChecksPassed, |r| r.code)
    }
}

/// The request as the engine sees it after classification.
#[derive(Debug)]
pub(crate) struct Action<'a> {
    pub connector: &'a Arc<Connector>,
    /// The action type: a REST route's or MCP tool's `action`, or `mcp.<method>`.
    pub action: &'a str,
    /// The params the route or tool declares, as read from the request.
    pub params: &'a Params,
}

/// Step 2 (after the host match and SSRF guard): may the agent use this connector at all?
pub(crate) fn check_connector(
    manifest: &Manifest,
    claims: Option<&CapabilityClaims>,
    connector: &Connector,
) -> Result<(), Decision> {
    if !manifest.policy.connectors.allows(&connector.name) {
        return Err(Decision::deny(
            Code::ToolNotAllowed,
            format!("connector {} is not allowed for this agent", connector.name),
        ));
    }
    if let Some(list) = claims.and_then(|c| c.connectors.as_ref())
        && !list.iter().any(|c| c == &connector.name)
    {
        return Err(Decision::deny(
            Code::TokenToolNotAllowed,
            format!("the capability token does not grant connector {}", connector.name),
        ));
    }
    if let Err(why) = &connector.credentials {
        // The reason names the missing source, never a secret; the connector must not be
        // reached unauthenticated.
        return Err(Decision::deny(
            Code::ConnectorUnavailable,
            format!("connector {} is unavailable: {why}", connector.name),
        ));
    }
    Ok(())
}

fn money_above(amount: Decimal, limit: Decimal) -> bool {
    amount > limit
}

/// Steps 3–7 for a request whose connector passed `check_connector` and whose route matched.
pub(crate) fn evaluate(manifest: &Manifest, claims: Option<&CapabilityClaims>, action: &Action) -> Decision {
    let p = &manifest.policy;
    let act = action.action;
    // 3. action type
    if !p.action_types.allows(act) {
        return Decision::deny(Code::ActionTypeNotAllowed, format!("action {act} is not allowed for this agent"));
    }
    if let Some(list) = claims.and_then(|c| c.action_types.as_ref())
        && !list.iter().any(|a| a == act)
    {
        return Decision::deny(
            Code::TokenActionTypeNotAllowed,
            format!("the capability token does not grant action {act}"),
        );
    }
    // 4. params: one reading each (never a guess), a declared amount must be readable (the
    // extractor already failed closed), and money needs a currency its rules name.
    let params = action.params;
    if let Some(why) = &params.ambiguous {
        return Decision::deny(Code::ParamAmbiguous, why.clone());
    }
    if let Err(d) = check_listed_values(manifest, claims, params) {
        return d;
    }
    if let Some(err) = &params.amount_error {
        return Decision::deny(Code::AmountInvalid, err.clone());
    }
    if let Err(d) = check_currency(manifest, claims, params) {
        return d;
    }
    let amount = params.amount.map(|a| (a, params.currency.clone()));

    // 5. approval triggers (accumulate)
    let mut escalate = Vec::new();
    if p.approval.action_types.iter().any(|a| a == act) {
        escalate.push(Reason::new(Code::RequiresHumanApproval, format!("action {act} requires human approval")));
    }
    if p.approval.connectors.iter().any(|c| c == &action.connector.name) {
        escalate.push(Reason::new(
            Code::RequiresHumanApproval,
            format!("connector {} requires human approval", action.connector.name),
        ));
    }
    if let Some((amt, Some(cur))) = &amount
        && let Some(limit) = p.approval.amount_above.get(cur)
        && money_above(*amt, *limit)
    {
        escalate.push(Reason::new(
            Code::AmountRequiresApproval,
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
                        Code::CurrencyNotAllowed,
                        format!("currency {shown} has no cap for this agent"),
                    );
                }
                Some((c, limit)) if money_above(*amt, *limit) => {
                    return Decision::deny(
                        Code::AmountExceedsCap,
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
                        Code::TokenAmountExceedsCap,
                        format!("amount {amt} {c} exceeds the token's cap {limit} {c}"),
                    );
                }
                Some(_) => {}
                None => {
                    let shown = cur.as_deref().unwrap_or("(none)");
                    return Decision::deny(
                        Code::TokenAmountExceedsCap,
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
                None => return Decision::deny(Code::JurisdictionNotAllowed, "the request names no jurisdiction"),
                Some(j) if !p.jurisdictions.allows_value(j) => {
                    return Decision::deny(Code::JurisdictionNotAllowed, format!("jurisdiction {j} is not allowed"));
                }
                Some(_) => {}
            }
        }
        if let Some(list) = token_constraints.and_then(|c| c.jurisdictions.as_ref())
            && !j.as_ref().is_some_and(|j| list.iter().any(|l| l.eq_ignore_ascii_case(j)))
        {
            return Decision::deny(
                Code::TokenJurisdictionNotAllowed,
                format!("the capability token does not allow jurisdiction {}", j.as_deref().unwrap_or("(none)")),
            );
        }
    }
    if params.declares("counterparty") {
        let cp = params.get("counterparty");
        let lists = &p.counterparties;
        match cp {
            None if !lists.is_empty() => {
                return Decision::deny(Code::CounterpartyNotInAllowlist, "the request names no counterparty");
            }
            Some(c) if lists.denies_value(c) => {
                return Decision::deny(Code::CounterpartyDenied, format!("counterparty {c} is on the deny list"));
            }
            Some(c) if !lists.allows_value(c) => {
                return Decision::deny(
                    Code::CounterpartyNotInAllowlist,
                    format!("counterparty {c} is not on the allow list"),
                );
            }
            _ => {}
        }
        if let Some(tc) = token_constraints.and_then(|c| c.counterparties.as_ref()) {
            let ok = cp.is_some_and(|c| {
                !AllowDeny::list_has_value(&tc.deny, c)
                    && (tc.allow.is_empty() || AllowDeny::list_has_value(&tc.allow, c))
            });
            if !ok {
                return Decision::deny(
                    Code::TokenCounterpartyNotAllowed,
                    format!("the capability token does not allow counterparty {}", cp.unwrap_or("(none)")),
                );
            }
        }
    }
    // 7. constraints on any declared param: the manifest's, then the token's.
    for (name, c) in &p.params {
        if params.declares(name)
            && let Err(miss) = check_param(name, &c.values.allow, &c.values.deny, c.min, c.max, params)
        {
            return miss.into_decision(Code::ParamNotAllowed, Code::ParamOutOfRange, "");
        }
    }
    if let Some(list) = token_constraints.and_then(|c| c.params.as_ref()) {
        for (name, c) in list {
            if params.declares(name)
                && let Err(miss) = check_param(name, &c.allow, &c.deny, c.min, c.max, params)
            {
                return miss.into_decision(
                    Code::TokenParamNotAllowed,
                    Code::TokenParamOutOfRange,
                    " under the capability token",
                );
            }
        }
    }
    if escalate.is_empty() { Decision::allow() } else { Decision::escalate(escalate) }
}

/// A value matched against a list (counterparties, jurisdictions, `policy.params` and the
/// token's constraints) must be one the upstream reads the same way: a control, invisible format
/// or non-ASCII whitespace character in it is `param_invalid` (SPEC §16.4), as the upstream
/// may cut or drop it and act on a listed value the comparison missed.
fn check_listed_values(
    manifest: &Manifest,
    claims: Option<&CapabilityClaims>,
    params: &Params,
) -> Result<(), Decision> {
    let p = &manifest.policy;
    let tc = claims.and_then(|c| c.constraints.as_ref());
    let listed = |name: &str| match name {
        "counterparty" if !p.counterparties.is_empty() || tc.is_some_and(|c| c.counterparties.is_some()) => true,
        "jurisdiction" if !p.jurisdictions.is_empty() || tc.is_some_and(|c| c.jurisdictions.is_some()) => true,
        _ => p.params.contains_key(name) || tc.and_then(|c| c.params.as_ref()).is_some_and(|l| l.contains_key(name)),
    };
    for (name, v) in &params.values {
        if let Some(c) = params::invalid_char(v).filter(|_| listed(name)) {
            return Err(Decision::deny(
                Code::ParamInvalid,
                format!(
                    "{name} holds U+{:04X}, which the upstream may drop or cut at; it cannot be matched",
                    u32::from(c)
                ),
            ));
        }
    }
    Ok(())
}

/// Money fails closed: while any currency-keyed rule exists (caps, approval thresholds, spend
/// budgets, the token's `amount_max`), an amount needs a 3-letter currency (`currency_required`)
/// that one of those rules names (`currency_not_allowed`).
fn check_currency(manifest: &Manifest, claims: Option<&CapabilityClaims>, params: &Params) -> Result<(), Decision> {
    if params.amount.is_none() {
        return Ok(());
    }
    let token_caps = claims.and_then(|c| c.constraints.as_ref()).map(|c| &c.amount_max);
    let mut named =
        manifest.policy.money_currencies().chain(token_caps.into_iter().flat_map(|m| m.keys().map(String::as_str)));
    let Some(first) = named.next() else { return Ok(()) };
    let cur = match params.currency.as_deref() {
        Some(c) if crate::config::is_currency(c) => c,
        Some(c) => {
            return Err(Decision::deny(
                Code::CurrencyRequired,
                format!("currency {:?} is not a 3-letter ISO-4217 code", params::truncate(c)),
            ));
        }
        None => {
            return Err(Decision::deny(
                Code::CurrencyRequired,
                "the request carries an amount but no currency, and this agent's money rules are per currency",
            ));
        }
    };
    if first != cur && !named.any(|n| n == cur) {
        return Err(Decision::deny(
            Code::CurrencyNotAllowed,
            format!("currency {cur} is named by none of this agent's money rules"),
        ));
    }
    Ok(())
}

/// Why a declared param's value fails a constraint.
enum ParamMiss {
    NotAllowed(String),
    OutOfRange(String),
}

impl ParamMiss {
    fn into_decision(self, not_allowed: Code, out_of_range: Code, under: &str) -> Decision {
        match self {
            ParamMiss::NotAllowed(m) => Decision::deny(not_allowed, format!("{m}{under}")),
            ParamMiss::OutOfRange(m) => Decision::deny(out_of_range, format!("{m}{under}")),
        }
    }
}

/// One constraint on one declared param. A missing value is not allowed; lists match ASCII
/// case-insensitively (deny wins, an empty allow list allows every value); `min`/`max` compare
/// decimals, inclusive (`amount` is compared after its scale is applied).
fn check_param(
    name: &str,
    allow: &[String],
    deny: &[String],
    min: Option<Decimal>,
    max: Option<Decimal>,
    params: &Params,
) -> Result<(), ParamMiss> {
    let Some(v) = params.get(name) else {
        return Err(ParamMiss::NotAllowed(format!("the request carries no {name}")));
    };
    let shown = params::truncate(v);
    if AllowDeny::list_has_value(deny, v) {
        return Err(ParamMiss::NotAllowed(format!("{name} {shown:?} is on the deny list")));
    }
    if !allow.is_empty() && !AllowDeny::list_has_value(allow, v) {
        return Err(ParamMiss::NotAllowed(format!("{name} {shown:?} is not on the allow list")));
    }
    if min.is_none() && max.is_none() {
        return Ok(());
    }
    let n = if name == "amount" { params.amount } else { params::parse_decimal_value(v) };
    let Some(n) = n else {
        return Err(ParamMiss::OutOfRange(format!("{name} {shown:?} is not a decimal number")));
    };
    if let Some(lo) = min
        && n < lo
    {
        return Err(ParamMiss::OutOfRange(format!("{name} {n} is below the minimum {lo}")));
    }
    if let Some(hi) = max
        && n > hi
    {
        return Err(ParamMiss::OutOfRange(format!("{name} {n} is above the maximum {hi}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
