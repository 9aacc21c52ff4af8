//! MCP connectors (SPEC §14.4): JSON-RPC 2.0 over streamable HTTP. Each JSON-RPC request posted
//! to the endpoint is one decision, classified here like a REST route: `tools/call` takes the
//! matching tool's action and params (read from the call's arguments), protocol housekeeping is
//! `mcp.session`, any other method `mcp.<method>`. The routing fields are read with the params
//! rules (a duplicated `method` or `name` is refused, never guessed), and `Mcp-Method` /
//! `Mcp-Name` headers must say what the body says. A GET (event stream) or DELETE (end of
//! session) that carries a body is malformed; other methods are no MCP request at all. Refusals
//! of a JSON-RPC request are answered as JSON-RPC errors (`respond::jsonrpc_refusal`), so MCP
//! clients show the reason.

use super::classify::{RequestBody, Rule};
use super::target::sanitize;
use super::{App, Facts, Stop};
use crate::config::{BodyFormat, Limits, McpEndpoint};
use crate::policy::{self, Code, Decision, JsonDoc, Params};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, Method, request::Parts};
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// Methods that only keep the session going; they are one action, `mcp.session`, and are not
/// counted in budgets.
const SESSION_METHODS: [&str; 7] = [
    "initialize",
    "ping",
    "tools/list",
    "resources/list",
    "prompts/list",
    "server/discover",
    "resources/templates/list",
];

pub(super) const SESSION_ACTION: &str = "mcp.session";

fn is_session(method: &str) -> bool {
    SESSION_METHODS.contains(&method) || method.starts_with("notifications/")
}

fn malformed(why: impl Into<String>) -> Stop {
    Stop::refuse(Decision::deny(Code::MalformedRequest, why))
}

fn mismatch(why: String) -> Stop {
    Stop::refuse(Decision::deny(Code::McpHeaderMismatch, why))
}

/// The one value of a header, if sent (twice is a mismatch by itself).
fn header_value<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Stop> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(mismatch(format!("{name} is sent more than once"))),
        (Some(v), None) => {
            v.to_str().map(|s| Some(s.trim())).map_err(|_| mismatch(format!("{name} is not valid text")))
        }
    }
}

/// The text an `Mcp-Method` / `Mcp-Name` header stands for. MCP clients send a value that would
/// not survive as a header field (non-ASCII, control characters, edge whitespace) as
/// `=?base64?<standard base64 of its UTF-8>?=` (the official SDKs do); any other value is itself.
/// A malformed wrapper (bad or non-canonical base64, not UTF-8) is a mismatch, never a guess.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<Cow<'a, str>>, Stop> {
    let Some(v) = header_value(headers, name)? else {
        return Ok(None);
    };
    let Some(payload) = v.strip_prefix("=?base64?").and_then(|r| r.strip_suffix("?=")) else {
        return Ok(Some(Cow::Borrowed(v)));
    };
    STANDARD
        .decode(payload)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(|t| Some(Cow::Owned(t)))
        .ok_or_else(|| mismatch(format!("{name} is not a valid =?base64?…?= value")))
}

/// A string the body gives at `ptr`: absent, one string, or a refusal (two readings, not a string).
fn string_at<'a>(doc: &'a JsonDoc, ptr: &str) -> Result<Option<&'a str>, Stop> {
    match doc.scalar(ptr) {
        Err(why) => Err(Stop::refuse(Decision::deny(Code::ParamAmbiguous, why))),
        Ok(None) | Ok(Some(serde_json::Value::Null)) => Ok(None),
        Ok(Some(serde_json::Value::String(s))) => Ok(Some(s)),
        Ok(Some(_)) => Err(malformed(format!("{ptr} must be a string"))),
    }
}

/// Classifies one MCP message: the rule it falls under and its params.
pub(super) async fn classify(
    gw: &App,
    mcp: &McpEndpoint,
    parts: &Parts,
    body: &mut RequestBody,
    facts: &mut Facts,
) -> Result<(Rule, Params), Stop> {
    classify_with(&gw.config().limits, mcp, parts, body, facts).await
}

/// [`classify`] with only the limits it reads (the fuzz entry point has no gateway).
pub(super) async fn classify_with(
    limits: &Limits,
    mcp: &McpEndpoint,
    parts: &Parts,
    body: &mut RequestBody,
    facts: &mut Facts,
) -> Result<(Rule, Params), Stop> {
    if facts.line.path != mcp.path {
        return Err(Stop::refuse(Decision::deny(
            Code::RouteNotAllowed,
            format!("{} is not this connector's MCP endpoint ({})", sanitize(&facts.line.path), mcp.path),
        )));
    }
    let headers = &parts.headers;
    if (parts.method == Method::GET || parts.method == Method::DELETE) && body.carries_body(headers) {
        // SPEC §16.3: servers that dispatch JSON-RPC whatever the method would run a call no
        // decision read. The record names what the body asked for when it was read (small).
        if let Some(doc) = body.buffered().and_then(|b| JsonDoc::parse(b).ok()) {
            let field = |p| string_at(&doc, p).ok().flatten().map(str::to_string);
            facts.action.mcp = field("/method").map(|m| (m, field("/params/name")));
        }
        return Err(malformed(format!("an MCP {} carries no body; JSON-RPC messages are POSTed", parts.method)));
    }
    if parts.method == Method::GET || parts.method == Method::DELETE {
        // The server-to-client event stream, and the end of a session.
        if let Some(m) = header_value(headers, "mcp-method")? {
            return Err(mismatch(format!(
                "Mcp-Method {:?} on a {} without a JSON-RPC body",
                sanitize(m),
                parts.method
            )));
        }
        facts.action.name = Some(SESSION_ACTION.into());
        return Ok((Rule::Protocol(SESSION_ACTION.into()), Params::default()));
    }
    if parts.method != Method::POST {
        return Err(Stop::refuse(Decision::deny(
            Code::RouteNotAllowed,
            format!("{} is not an MCP request (POST, GET or DELETE)", parts.method),
        )));
    }
    let b = body.buffer(headers, limits, facts).await?;
    policy::check_media_type(BodyFormat::Json, "an MCP endpoint reads", headers, b).map_err(Stop::refuse)?;
    let doc = JsonDoc::parse(b).map_err(malformed)?;
    if doc.is_array() {
        return Err(malformed("JSON-RPC batches are not accepted: send one request per HTTP request"));
    }
    if !doc.is_object() {
        return Err(malformed("the body is not a JSON-RPC message"));
    }
    let id = doc.scalar("/id").map_err(|why| Stop::refuse(Decision::deny(Code::ParamAmbiguous, why)))?;
    match id {
        None | Some(serde_json::Value::Null) => {}
        Some(v @ (serde_json::Value::String(_) | serde_json::Value::Number(_))) => {
            facts.action.jsonrpc_id = Some(v.clone())
        }
        Some(_) => return Err(malformed("a JSON-RPC id is a string or a number")),
    }
    let Some(method) = string_at(&doc, "/method")? else {
        // A response to a request of the server's (sampling, elicitation): part of the session.
        let is_response = doc.has("/result").unwrap_or(false) || doc.has("/error").unwrap_or(false);
        if !is_response {
            return Err(malformed("a JSON-RPC message needs a method (or a result or error)"));
        }
        if header_value(headers, "mcp-method")?.is_some() {
            return Err(mismatch("Mcp-Method on a JSON-RPC response".into()));
        }
        facts.action.mcp = Some(("(response)".into(), None));
        facts.action.name = Some(SESSION_ACTION.into());
        return Ok((Rule::Protocol(SESSION_ACTION.into()), Params::default()));
    };
    if method.is_empty() || method.len() > 128 || !method.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(malformed("the JSON-RPC method is not a method name"));
    }
    // Recorded before the header checks, so a refused mismatch shows what the body asked for.
    facts.action.mcp = Some((method.to_string(), None));
    if let Some(h) = header_text(headers, "mcp-method")?
        && h != method
    {
        return Err(mismatch(format!("Mcp-Method says {:?}, the body calls {:?}", sanitize(&h), sanitize(method))));
    }
    // The name the call acts on: a tool's or prompt's name, a resource's URI.
    let name = match method {
        "tools/call" | "prompts/get" => string_at(&doc, "/params/name")?,
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => string_at(&doc, "/params/uri")?,
        _ => None,
    };
    facts.action.mcp = Some((method.to_string(), name.map(str::to_string)));
    if let Some(h) = header_text(headers, "mcp-name")?
        && Some(h.as_ref()) != name
    {
        return Err(mismatch(format!(
            "Mcp-Name says {:?}, the body names {:?}",
            sanitize(&h),
            name.map(sanitize).unwrap_or_default()
        )));
    }
    // An override binds the call (method and params), not the JSON-RPC id a retry renews.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(b) {
        let call = serde_json::json!({"method": method, "params": v.get("params")});
        facts.action.bound_body = crate::audit::canonical_json(&call).ok().map(|c| hex::encode(Sha256::digest(c)));
    }
    if method == "tools/call" {
        let Some(tool_name) = name else {
            return Err(malformed("tools/call needs params.name"));
        };
        let Some((index, tool)) =
            mcp.tools.iter().enumerate().find(|(_, t)| t.name.as_deref().is_none_or(|n| n == tool_name))
        else {
            return Err(Stop::refuse(Decision::deny(
                Code::ToolNotAllowed,
                format!("no tool rule of this connector allows {}", sanitize(tool_name)),
            )));
        };
        facts.action.route = Some(mcp.path.clone());
        facts.action.name = Some(tool.rule.action.clone());
        let params = policy::extract_params(&tool.rule, &[], headers, facts.line.query.as_deref(), Some(b));
        return Ok((Rule::Tool(index), params));
    }
    let action = if is_session(method) { SESSION_ACTION.to_string() } else { format!("mcp.{method}") };
    if action != SESSION_ACTION {
        facts.action.route = Some(mcp.path.clone());
    }
    facts.action.name = Some(action.clone());
    Ok((Rule::Protocol(action), Params::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn text(value: &'static str) -> Result<Option<String>, ()> {
        let mut h = HeaderMap::new();
        h.insert("mcp-name", HeaderValue::from_static(value));
        header_text(&h, "mcp-name").map(|t| t.map(|c| c.into_owned())).map_err(|_| ())
    }

    #[test]
    fn plain_header_values_are_themselves() {
        assert_eq!(text("read_ticket"), Ok(Some("read_ticket".into())));
        assert_eq!(text("file:///tmp/a b.txt"), Ok(Some("file:///tmp/a b.txt".into())));
        assert_eq!(header_text(&HeaderMap::new(), "mcp-name").ok().flatten(), None);
    }

    #[test]
    fn base64_wrapped_values_are_decoded() {
        // What the MCP Python SDK sends for "résumé" and for " padded ".
        assert_eq!(text("=?base64?csOpc3Vtw6k=?="), Ok(Some("résumé".into())));
        assert_eq!(text("=?base64?IHBhZGRlZCA=?="), Ok(Some(" padded ".into())));
    }

    #[test]
    fn malformed_wrappers_are_mismatches() {
        assert_eq!(text("=?base64?not base64!?="), Err(()), "not base64");
        assert_eq!(text("=?base64?YR==?="), Err(()), "non-zero trailing bits (non-canonical)");
        assert_eq!(text("=?base64?YQ?="), Err(()), "missing padding (non-canonical)");
        assert_eq!(text("=?base64?/w==?="), Err(()), "not UTF-8");
    }
}
