//! Entry points for the fuzz targets (`fuzz/fuzz_targets/`): request-path readers of peer bytes
//! that the library's API does not otherwise expose, called exactly as the proxy calls them.
//! Not an interface for anything else; it may change with the code it calls.

use super::classify::{RequestBody, Rule};
use super::{Arrival, Facts, Stop, mcp};
use crate::config::{Limits, McpEndpoint};
use crate::policy::Params;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// What the MCP classifier made of one message.
#[derive(Debug)]
pub struct McpClassified {
    /// The action the message is decided as (`mcp.session`, `mcp.<method>`, or a tool's).
    pub action: String,
    /// The index of the tool rule of a `tools/call` (`None` for protocol messages).
    pub tool: Option<usize>,
    /// The method and the name (tool, prompt, resource) recorded for the message.
    pub mcp: Option<(String, Option<String>)>,
    /// The JSON-RPC id its refusals would be answered with.
    pub jsonrpc_id: Option<serde_json::Value>,
    pub params: Params,
}

/// A refusal of the MCP classifier: its status and reason code (`None` for a stage that
/// answered by itself).
#[derive(Debug)]
pub struct McpRefused {
    pub status: Option<http::StatusCode>,
    pub code: Option<&'static str>,
}

/// Runs the MCP classifier (`proxy::mcp`) on one request whose body is already read, as the
/// proxy does for a request to `mcp`'s connector.
pub fn classify_mcp(
    limits: &Limits,
    mcp: &McpEndpoint,
    request: http::Request<Vec<u8>>,
) -> Result<McpClassified, McpRefused> {
    let (parts, body) = request.into_parts();
    let mut facts = Facts::new(&parts.method, &parts.uri, Arrival::BaseUrl);
    let mut body = RequestBody::Buffered(body.into());
    let classified = {
        // A buffered body is never awaited: the future is ready on its first poll.
        let fut = pin!(mcp::classify_with(limits, mcp, &parts, &mut body, &mut facts));
        match poll_once(fut) {
            Some(r) => r,
            None => return Err(McpRefused { status: None, code: None }),
        }
    };
    match classified {
        Ok((rule, params)) => Ok(McpClassified {
            action: facts.action.name.clone().unwrap_or_default(),
            tool: match rule {
                Rule::Tool(i) => Some(i),
                _ => None,
            },
            mcp: facts.action.mcp.clone(),
            jsonrpc_id: facts.action.jsonrpc_id.clone(),
            params,
        }),
        Err(Stop::Refuse { decision, at, .. }) => {
            Err(McpRefused { status: Some(decision.code().status(at)), code: Some(decision.code().as_str()) })
        }
        Err(Stop::Respond(_)) => Err(McpRefused { status: None, code: None }),
    }
}

fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Option<F::Output> {
    match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Strictness, load_gateway, parse_manifest};
    use std::path::Path;

    const MANIFEST: &str = r#"apiVersion: uapk/v1
kind: Manifest
agent:
  id: fuzz-agent
capability:
  required: false
connectors:
  - name: tickets
    base_url: https://mcp.example
    hosts: [mcp.example]
    protocol: mcp
    tools:
      - name: read_ticket
        action: ticket.read
      - name: refund
        action: payment.refund
        params:
          counterparty: { json: /customer }
"#;

    fn classify(method: &str, body: &str) -> Result<McpClassified, McpRefused> {
        let (m, _) = parse_manifest(Path::new("t.yaml"), MANIFEST.as_bytes(), Path::new("/"), Strictness::Run)
            .expect("manifest");
        let limits = load_gateway(None).expect("defaults").limits;
        let req = http::Request::builder()
            .method(method)
            .uri("/mcp")
            .header("content-type", "application/json")
            .body(body.as_bytes().to_vec())
            .expect("request");
        classify_mcp(&limits, m.connectors[0].mcp.as_ref().expect("mcp"), req)
    }

    #[test]
    fn the_entry_point_runs_the_classifier() {
        let c = classify(
            "POST",
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"refund","arguments":{"customer":"cus_1"}}}"#,
        )
        .expect("allowed");
        assert_eq!((c.action.as_str(), c.tool), ("payment.refund", Some(1)));
        assert_eq!(c.mcp, Some(("tools/call".to_string(), Some("refund".to_string()))));
        assert_eq!(c.jsonrpc_id, Some(serde_json::json!(7)));
        assert_eq!(c.params.get("counterparty"), Some("cus_1"));

        let r = classify("POST", r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#).expect_err("a batch");
        assert_eq!((r.status, r.code), (Some(http::StatusCode::BAD_REQUEST), Some("malformed_request")));
        let r = classify("POST", r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"drop"}}"#)
            .expect_err("an unlisted tool");
        assert_eq!(r.code, Some("tool_not_allowed"));
        assert_eq!(classify("GET", "").expect("the event stream").action, "mcp.session");
    }
}
