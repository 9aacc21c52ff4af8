//! The MCP JSON-RPC classifier (`proxy::mcp`) on what an agent posts to an MCP endpoint.
//!
//! Input: an HTTP request as text: `METHOD PATH`, header lines, a blank line, the body. The
//! endpoint is `/mcp` with tool rules `read_ticket` and `refund` (and, when the request line
//! ends in `*`, a last `*` rule that takes any tool).
//!
//! Invariants: never a panic; what is allowed is what a JSON-RPC server reading the same body
//! (serde_json, duplicate keys last-wins) would run: the recorded method is the body's `method`;
//! a `tools/call` names, in `params.name`, the tool of the first rule that matches it, and
//! takes that rule's action; housekeeping is `mcp.session`, any other method `mcp.<method>`; a
//! body without a method is a response (`result` or `error`); the JSON-RPC id is the body's;
//! a plain `Mcp-Method` header says the body's method. Batches, other paths and methods other
//! than POST, GET and DELETE are refused; GET and DELETE (no body) are `mcp.session`.
#![no_main]
use http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;
use uapk_gateway::config::{GatewayConfig, Manifest, McpEndpoint, Strictness, load_gateway, parse_manifest};
use uapk_gateway::proxy::fuzzing::classify_mcp;

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
        params:
          ticket: { json: /id }
      - name: refund
        action: payment.refund
        params:
          amount:       { json: /amount, scale: 2 }
          currency:     { value: USD }
          counterparty: { json: /customer }
  - name: wild
    base_url: https://wild.example
    hosts: [wild.example]
    protocol: mcp
    tools:
      - name: read_ticket
        action: ticket.read
      - name: "*"
        action: tool.any
"#;

const SESSION: [&str; 7] = [
    "initialize",
    "ping",
    "tools/list",
    "resources/list",
    "prompts/list",
    "server/discover",
    "resources/templates/list",
];

fn setup() -> &'static (Manifest, GatewayConfig) {
    static S: OnceLock<(Manifest, GatewayConfig)> = OnceLock::new();
    S.get_or_init(|| {
        let m = parse_manifest(Path::new("fuzz.yaml"), MANIFEST.as_bytes(), Path::new("/nonexistent"), Strictness::Run)
            .map(|(m, _)| m)
            .unwrap_or_else(|e| panic!("the fuzz manifest is invalid: {e:?}"));
        let g = load_gateway(None).unwrap_or_else(|e| panic!("default gateway config: {e:?}"));
        (m, g)
    })
}

fn endpoint(m: &Manifest, wild: bool) -> &McpEndpoint {
    m.connectors[usize::from(wild)].mcp.as_ref().expect("an MCP connector")
}

fuzz_target!(|data: &[u8]| {
    let (m, g) = setup();
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &b""[..]),
    };
    let Ok(head) = std::str::from_utf8(head) else { return };
    let mut lines = head.split('\n');
    let line = lines.next().unwrap_or_default();
    let wild = line.ends_with('*');
    let mut words = line.trim_end_matches('*').split(' ');
    let (Some(method), Some(path)) = (words.next(), words.next()) else { return };
    let mut builder = Request::builder().method(method).uri(path);
    for l in lines {
        let Some((name, value)) = l.split_once(':') else { return };
        builder = builder.header(name.trim(), value.trim());
    }
    let Ok(request) = builder.body(body.to_vec()) else { return };
    let mcp = endpoint(m, wild);
    let http_method = request.method().clone();
    let on_endpoint = request.uri().path() == mcp.path;
    let mcp_method_headers: Vec<String> = request
        .headers()
        .get_all("mcp-method")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
        .collect();

    let result = classify_mcp(&g.limits, mcp, request);
    let Ok(c) = result else { return };

    assert!(on_endpoint, "classified a request to another path: {c:?}");
    if http_method == Method::GET || http_method == Method::DELETE {
        assert_eq!(c.action, "mcp.session");
        assert!(mcp_method_headers.is_empty(), "Mcp-Method on a {http_method}");
        return;
    }
    assert_eq!(http_method, Method::POST, "classified a {http_method}");
    let v: Value = serde_json::from_slice(body).expect("an allowed body is JSON");
    let Value::Object(msg) = &v else { panic!("allowed a message that is not an object: {v}") };
    match msg.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => assert_eq!(c.jsonrpc_id.as_ref(), Some(id)),
        _ => assert_eq!(c.jsonrpc_id, None),
    }
    let recorded = c.mcp.as_ref().map(|(m, _)| m.as_str());
    let method = match msg.get("method") {
        None | Some(Value::Null) => {
            assert!(msg.contains_key("result") || msg.contains_key("error"), "allowed a message with no method: {v}");
            assert_eq!(c.action, "mcp.session");
            assert_eq!(recorded, Some("(response)"));
            assert!(mcp_method_headers.is_empty());
            return;
        }
        Some(Value::String(s)) => s.as_str(),
        Some(other) => panic!("allowed a method that is not a string: {other}"),
    };
    assert_eq!(recorded, Some(method), "recorded method differs from the body's");
    if let [h] = mcp_method_headers.as_slice()
        && !h.starts_with("=?base64?")
    {
        assert_eq!(h, method, "Mcp-Method differs from the body's method");
    }
    let name = v.pointer("/params/name").and_then(Value::as_str);
    if method == "tools/call" {
        let name = name.unwrap_or_else(|| panic!("a tools/call allowed without params.name: {v}"));
        let i = c.tool.expect("a tools/call is classified by a tool rule");
        let first = mcp.tools.iter().position(|t| t.name.as_deref().is_none_or(|n| n == name));
        assert_eq!(first, Some(i), "tools/call {name:?} took rule {i}");
        assert_eq!(c.action, mcp.tools[i].rule.action);
        assert_eq!(c.mcp.as_ref().and_then(|(_, n)| n.as_deref()), Some(name));
        return;
    }
    assert_eq!(c.tool, None);
    if SESSION.contains(&method) || method.starts_with("notifications/") {
        assert_eq!(c.action, "mcp.session");
    } else {
        assert_eq!(c.action, format!("mcp.{method}"));
    }
});
