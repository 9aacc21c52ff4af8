//! Every reason code the gateway emits (docs/manifest.md, "Reason codes"), its wire string and
//! the HTTP status of a refusal that carries it: one table, so no stage picks a status by hand.

use http::StatusCode;
use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $s:literal,)*) => {
        /// A reason code. `as_str` is the string on the wire, in records and in metrics labels.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $($(#[$doc])* $variant,)*
        }

        impl Code {
            /// Every code, in the order of docs/manifest.md.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The code as written on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $s,)*
                }
            }
        }
    };
}

codes! {
    AllChecksPassed = "all_checks_passed",
    // identity
    CapabilityTokenRequired = "capability_token_required",
    CapabilityTokenInvalid = "capability_token_invalid",
    CapabilityTokenExpired = "capability_token_expired",
    CapabilityTokenRevoked = "capability_token_revoked",
    TokenAgentMismatch = "token_agent_mismatch",
    ManifestNotFound = "manifest_not_found",
    ManifestInvalid = "manifest_invalid",
    // connector and route
    HostNotAllowed = "host_not_allowed",
    SsrfBlocked = "ssrf_blocked",
    ToolNotAllowed = "tool_not_allowed",
    TokenToolNotAllowed = "token_tool_not_allowed",
    ConnectorUnavailable = "connector_unavailable",
    CleartextNotAllowed = "cleartext_not_allowed",
    RouteNotAllowed = "route_not_allowed",
    ActionTypeNotAllowed = "action_type_not_allowed",
    TokenActionTypeNotAllowed = "token_action_type_not_allowed",
    McpHeaderMismatch = "mcp_header_mismatch",
    // params
    AmountInvalid = "amount_invalid",
    ParamAmbiguous = "param_ambiguous",
    ParamInvalid = "param_invalid",
    UnsupportedMediaType = "unsupported_media_type",
    CurrencyRequired = "currency_required",
    CurrencyNotAllowed = "currency_not_allowed",
    // escalation
    RequiresHumanApproval = "requires_human_approval",
    AmountRequiresApproval = "amount_requires_approval",
    BudgetThresholdReached = "budget_threshold_reached",
    TooManyPendingApprovals = "too_many_pending_approvals",
    // limits
    AmountExceedsCap = "amount_exceeds_cap",
    TokenAmountExceedsCap = "token_amount_exceeds_cap",
    JurisdictionNotAllowed = "jurisdiction_not_allowed",
    TokenJurisdictionNotAllowed = "token_jurisdiction_not_allowed",
    CounterpartyDenied = "counterparty_denied",
    CounterpartyNotInAllowlist = "counterparty_not_in_allowlist",
    TokenCounterpartyNotAllowed = "token_counterparty_not_allowed",
    ParamNotAllowed = "param_not_allowed",
    ParamOutOfRange = "param_out_of_range",
    TokenParamNotAllowed = "token_param_not_allowed",
    TokenParamOutOfRange = "token_param_out_of_range",
    BudgetExceeded = "budget_exceeded",
    RateLimited = "rate_limited",
    RateLimitUnavailable = "rate_limit_unavailable",
    RefusalsRateLimited = "refusals_rate_limited",
    TooManyRequestsInFlight = "too_many_requests_in_flight",
    // overrides and approvals
    OverrideTokenInvalid = "override_token_invalid",
    OverrideTokenAlreadyUsed = "override_token_already_used",
    OverrideAccepted = "override_accepted",
    ApprovalGranted = "approval_granted",
    ApprovalDenied = "approval_denied",
    ApprovalTimeout = "approval_timeout",
    ApprovalNotFound = "approval_not_found",
    ApprovalStoreUnavailable = "approval_store_unavailable",
    // transport
    MalformedRequest = "malformed_request",
    BodyTooLarge = "body_too_large",
    BodyTimeout = "body_timeout",
    MisdirectedRequest = "misdirected_request",
    UpgradeNotAllowed = "upgrade_not_allowed",
    UpstreamUnresolvable = "upstream_unresolvable",
    UpstreamUnavailable = "upstream_unavailable",
    UpstreamTimeout = "upstream_timeout",
    AuditUnavailable = "audit_unavailable",
    InterceptionUnavailable = "interception_unavailable",
    ShuttingDown = "shutting_down",
    TooManyConnections = "too_many_connections",
}

/// Where a refusal is answered, when that changes its status (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum At {
    /// Any request the data path decides.
    #[default]
    Request,
    /// The explicit proxy (absolute-form or CONNECT): identity failures are 407 with
    /// `Proxy-Authenticate`, so clients offer credentials.
    ProxyAuth,
    /// A path that names nothing the gateway serves: 404.
    NoSuchPath,
    /// A method the target does not serve: 405.
    WrongMethod,
    /// Connecting to the upstream timed out: 504 rather than 502.
    ConnectTimeout,
}

impl Code {
    /// The HTTP status of a refusal carrying this code, answered `at`.
    pub(crate) const fn status(self, at: At) -> StatusCode {
        use Code::*;
        match (self, at) {
            (AllChecksPassed | OverrideAccepted | ApprovalGranted, _) => StatusCode::OK,
            (
                CapabilityTokenRequired
                | CapabilityTokenInvalid
                | CapabilityTokenExpired
                | CapabilityTokenRevoked
                | TokenAgentMismatch,
                At::ProxyAuth,
            ) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            (RouteNotAllowed | ApprovalNotFound, At::NoSuchPath) => StatusCode::NOT_FOUND,
            (RouteNotAllowed | MalformedRequest, At::WrongMethod) => StatusCode::METHOD_NOT_ALLOWED,
            (UpstreamUnavailable, At::ConnectTimeout) => StatusCode::GATEWAY_TIMEOUT,
            (ApprovalNotFound, _) => StatusCode::NOT_FOUND,
            (MalformedRequest | UpgradeNotAllowed, _) => StatusCode::BAD_REQUEST,
            (UnsupportedMediaType, _) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            (BodyTooLarge, _) => StatusCode::PAYLOAD_TOO_LARGE,
            (BodyTimeout, _) => StatusCode::REQUEST_TIMEOUT,
            (MisdirectedRequest, _) => StatusCode::MISDIRECTED_REQUEST,
            (RateLimited | RefusalsRateLimited | TooManyRequestsInFlight, _) => StatusCode::TOO_MANY_REQUESTS,
            (UpstreamUnresolvable | UpstreamUnavailable | InterceptionUnavailable, _) => StatusCode::BAD_GATEWAY,
            (UpstreamTimeout, _) => StatusCode::GATEWAY_TIMEOUT,
            (
                RateLimitUnavailable | ApprovalStoreUnavailable | AuditUnavailable | ShuttingDown | TooManyConnections,
                _,
            ) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

/// A string that is no reason code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCode;

impl fmt::Display for UnknownCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown reason code")
    }
}

impl std::error::Error for UnknownCode {}

impl FromStr for Code {
    type Err = UnknownCode;
    fn from_str(s: &str) -> Result<Code, UnknownCode> {
        Code::ALL.iter().copied().find(|c| c.as_str() == s).ok_or(UnknownCode)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Code {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes between backticks in docs/manifest.md's "Reason codes" section.
    fn documented() -> Vec<&'static str> {
        let doc = include_str!("../../docs/manifest.md");
        let section = doc.split("## Reason codes").nth(1).expect("docs/manifest.md has a Reason codes section");
        let section = section.split("\n## ").next().unwrap_or(section);
        section.split('`').skip(1).step_by(2).collect()
    }

    #[test]
    fn every_code_is_documented_and_every_documented_code_exists() {
        let doc = documented();
        for c in Code::ALL {
            assert!(doc.contains(&c.as_str()), "{c} is not documented in docs/manifest.md");
        }
        for d in doc {
            assert!(d.parse::<Code>().is_ok(), "{d} is documented but is no Code");
        }
    }

    #[test]
    fn as_str_round_trips() {
        for &c in Code::ALL {
            assert_eq!(c.as_str().parse::<Code>(), Ok(c));
            assert_eq!(serde_json::to_value(c).expect("serializes"), serde_json::json!(c.as_str()));
        }
        assert_eq!("".parse::<Code>(), Err(UnknownCode));
        assert_eq!("Budget_exceeded".parse::<Code>(), Err(UnknownCode));
        let mut seen: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), Code::ALL.len(), "two codes share a string");
    }

    #[test]
    fn statuses_follow_spec_section_7() {
        assert_eq!(Code::BudgetExceeded.status(At::Request), StatusCode::FORBIDDEN);
        assert_eq!(Code::CapabilityTokenRequired.status(At::Request), StatusCode::FORBIDDEN);
        assert_eq!(Code::CapabilityTokenRequired.status(At::ProxyAuth), StatusCode::PROXY_AUTHENTICATION_REQUIRED);
        assert_eq!(Code::TokenAgentMismatch.status(At::ProxyAuth), StatusCode::PROXY_AUTHENTICATION_REQUIRED);
        assert_eq!(Code::ManifestNotFound.status(At::ProxyAuth), StatusCode::FORBIDDEN);
        assert_eq!(Code::RateLimited.status(At::Request), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(Code::AuditUnavailable.status(At::Request), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Code::MisdirectedRequest.status(At::Request), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(Code::MalformedRequest.status(At::WrongMethod), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(Code::RouteNotAllowed.status(At::NoSuchPath), StatusCode::NOT_FOUND);
        assert_eq!(Code::UpstreamUnavailable.status(At::ConnectTimeout), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(Code::UpstreamUnavailable.status(At::Request), StatusCode::BAD_GATEWAY);
    }
}
