//! Stage 2, the identity: who is calling — a verified capability token (presented on the
//! request, on the tunnel's CONNECT, or by the gateway from `identity.token_file`), or the pod's
//! default agent — and the agent's manifest.

use super::{App, Facts, Policies, TokenFile, target::sanitize};
use crate::clock::now_unix;
use crate::config::Manifest;
use crate::identity::CapabilityClaims;
use crate::policy::{At, Code, Decision};
use http::{HeaderMap, header};
use std::sync::Arc;

/// The identified agent.
pub(crate) struct Identity {
    pub manifest: Arc<Manifest>,
    pub claims: Option<Arc<CapabilityClaims>>,
}

/// Splits `Proxy-Authorization` into (username, token): Basic uses the password, Bearer the
/// credential. Never logged.
pub(crate) fn proxy_auth_token(headers: &HeaderMap) -> Option<(Option<String>, String)> {
    use base64::Engine;
    let v = headers.get(header::PROXY_AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some((None, rest.trim().to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, pass) = text.split_once(':')?;
        return Some((Some(user.to_string()), pass.to_string()));
    }
    None
}

/// Step 1 (SPEC §8): who is calling. Fills in `facts.{agent,token,mode}`.
pub(crate) fn identify(
    gw: &App,
    policies: &Policies,
    headers: &HeaderMap,
    facts: &mut Facts,
    preset: Option<(Option<String>, String)>,
) -> Result<Identity, Decision> {
    let mut basic_user = None;
    let from_proxy_auth = if facts.arrival.is_explicit() { proxy_auth_token(headers) } else { None };
    let token = match preset.or(from_proxy_auth) {
        Some((user, tok)) => {
            basic_user = user;
            Some(tok)
        }
        _ => headers
            .get("x-uapk-capability")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
            .or_else(|| gw.token_file().and_then(TokenFile::get)),
    };
    let default_agent = gw.config().identity.default_agent.as_deref();
    facts.caller.agent = default_agent.map(str::to_string);
    let Some(token) = token else {
        let Some(agent) = default_agent else {
            return Err(Decision::deny(Code::CapabilityTokenRequired, "no capability token and no default agent"));
        };
        let Some(m) = policies.set.get(agent) else {
            return Err(missing_manifest(policies, agent));
        };
        facts.caller.mode = m.mode;
        if m.capability.required {
            return Err(Decision::deny(Code::CapabilityTokenRequired, "this agent requires a capability token"));
        }
        return Ok(Identity { manifest: m.clone(), claims: None });
    };
    let Some(sub) = crate::identity::unverified_subject(&token) else {
        return Err(Decision::deny(Code::CapabilityTokenInvalid, "the capability token is malformed"));
    };
    let (Some(m), Some(verifier)) = (policies.set.get(&sub), policies.verifiers.get(&sub)) else {
        return Err(missing_manifest(policies, &sub));
    };
    facts.caller.mode = m.mode;
    let claims = verifier.verify(&token, now_unix()).map_err(|e| Decision::deny(e.code(), e.message()))?;
    facts.caller.verified(&claims);
    let user_names_other = basic_user.as_deref().is_some_and(|u| !u.is_empty() && u != "agent" && u != claims.sub);
    if default_agent.is_some_and(|d| d != claims.sub) || user_names_other {
        return Err(Decision::deny(Code::TokenAgentMismatch, "the capability token was issued to another agent"));
    }
    Ok(Identity { manifest: m.clone(), claims: Some(claims) })
}

/// No manifest serves `agent`: `manifest_invalid` when its manifest file failed validation
/// (SPEC §17), else `manifest_not_found`.
fn missing_manifest(policies: &Policies, agent: &str) -> Decision {
    match policies.set.invalid_for(agent) {
        Some(i) => Decision::deny(
            Code::ManifestInvalid,
            format!(
                "the manifest of agent {} ({}) failed validation; its requests are refused until it is fixed",
                sanitize(agent),
                i.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            ),
        ),
        None => Decision::deny(Code::ManifestNotFound, format!("no manifest for the agent {}", sanitize(agent))),
    }
}

/// The refusal of a request whose agent could not be identified: 407 on the explicit proxy
/// for token problems (so clients offer credentials), else 403; recorded with the connector a
/// base-URL path named.
pub(crate) fn refusal(facts: &mut Facts, target: &super::target::Target, d: Decision) -> super::Stop {
    let at = if facts.arrival.is_explicit() { At::ProxyAuth } else { At::Request };
    if let Some(name) = &target.base_connector {
        facts.action.connector = Some(sanitize(name));
    }
    super::Stop::refuse_at(d, at)
}
