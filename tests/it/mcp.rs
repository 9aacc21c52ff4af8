//! MCP connectors end to end at the HTTP level: every JSON-RPC request posted to the endpoint is
//! one decision, `tools/call` takes the tool's action and params, protocol housekeeping is
//! `mcp.session`, refusals come back as JSON-RPC errors an MCP client shows, and nothing that
//! could be read two ways (a batch, a duplicated key, a header that contradicts the body) reaches
//! the server. (`scripts/mcp-sdk-test.sh` drives the official MCP SDK through the same paths.)

use crate::support::*;
use serde_json::{Value, json};

fn mcp_manifest(up: std::net::SocketAddr, extra: &str) -> String {
    let head = manifest_head("mcp-agent", "  required: true\n");
    format!(
        r#"{head}connectors:
  - name: tickets
    base_url: http://{up}
    hosts: [127.0.0.1]
    ports: [{port}]
    protocol: mcp
    tools:
      - name: read_ticket
        action: ticket.read
      - name: refund
        action: payment.refund
        params:
          amount:       {{ json: /amount, scale: 2 }}
          currency:     {{ value: USD }}
          counterparty: {{ json: /customer }}
policy:
  approval:
    amount_above: {{ USD: "50.00" }}
  counterparties: {{ deny: [cus_blocked] }}
  budgets:
    - window: day
      scope: agent
      max_actions: 100
{extra}"#,
        port = up.port()
    )
}

struct Mcp {
    gw: TestGateway,
    up: Upstream,
    tok: String,
}

impl Mcp {
    async fn start(admin: &str) -> Mcp {
        let up = Upstream::start().await;
        let gw = TestGateway::start(&[("mcp.yaml", mcp_manifest(up.addr, ""))], admin).await;
        Mcp { gw, up, tok: token("mcp-agent") }
    }

    async fn post(&self, body: Value, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Value) {
        self.post_raw(body.to_string(), headers).await
    }

    async fn post_raw(&self, body: String, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut rb = client()
            .post(self.gw.base("/tickets/mcp"))
            .header("x-uapk-capability", &self.tok)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.unwrap();
        let (status, h) = (r.status().as_u16(), r.headers().clone());
        (status, h, r.json().await.unwrap_or(Value::Null))
    }

    fn decision(&self, h: &reqwest::header::HeaderMap) -> Value {
        self.gw.entry(h["x-uapk-record"].to_str().unwrap().parse().unwrap())
    }
}

fn call(id: u64, tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}})
}

/// Checks the shape of a refusal answered as a JSON-RPC error and returns its record index.
fn jsonrpc_refusal(v: &Value, id: u64, decision: &str, code: &str) -> u64 {
    assert_eq!(v["jsonrpc"], "2.0", "{v}");
    assert_eq!(v["id"], id);
    assert_eq!(v["error"]["code"], -32003);
    let record = v["error"]["data"]["record"].as_u64().expect("a record index");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with(&format!("{decision}: {code}: ")), "{msg}");
    assert!(msg.ends_with(&format!("(record {record})")), "{msg}");
    assert_eq!(v["error"]["data"]["decision"], decision);
    assert_eq!(v["error"]["data"]["reasons"][0]["code"], code);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_json_rpc_request_is_one_decision_by_tool() {
    let m = Mcp::start("").await;
    // Housekeeping is mcp.session, forwarded, and counts in no budget.
    for (i, method) in ["initialize", "notifications/initialized", "tools/list", "ping"].iter().enumerate() {
        let mut msg = json!({"jsonrpc": "2.0", "method": method, "params": {}});
        if !method.starts_with("notifications/") {
            msg["id"] = json!(i);
        }
        let (status, h, _) = m.post(msg, &[("mcp-method", method)]).await;
        assert_eq!(status, 200);
        let e = m.decision(&h);
        assert_eq!((e["action"].as_str(), e["mcp_method"].as_str()), (Some("mcp.session"), Some(*method)));
        assert!(e["route"].is_null(), "housekeeping is not an action budgets count: {e}");
    }
    // An allowed tool: its action, recorded with the tool's name.
    let headers = [("mcp-method", "tools/call"), ("mcp-name", "read_ticket")];
    let (status, h, _) = m.post(call(10, "read_ticket", json!({"id": "T-1"})), &headers).await;
    assert_eq!(status, 200);
    let e = m.decision(&h);
    assert_eq!((e["action"].as_str(), e["decision"].as_str()), (Some("ticket.read"), Some("allow")));
    assert_eq!((e["mcp_method"].as_str(), e["mcp_name"].as_str()), (Some("tools/call"), Some("read_ticket")));
    assert_eq!(e["route"], "/mcp");
    let seen = m.up.last();
    assert_eq!(seen.path, "/mcp");
    assert_eq!(serde_json::from_slice::<Value>(&seen.body).unwrap()["params"]["name"], "read_ticket");
    // A small refund: params read from the arguments, the currency fixed by the tool.
    let (status, h, _) = m.post(call(11, "refund", json!({"amount": 1500, "customer": "cus_1"})), &[]).await;
    assert_eq!(status, 200);
    let e = m.decision(&h);
    assert_eq!(e["action"], "payment.refund");
    assert_eq!(e["params"], json!({"amount": "15", "currency": "USD", "counterparty": "cus_1"}));
    // Other methods are actions of their own.
    let read = json!({"jsonrpc": "2.0", "id": 12, "method": "resources/read", "params": {"uri": "t://1"}});
    let (_, h, _) = m.post(read, &[]).await;
    let e = m.decision(&h);
    assert_eq!((e["action"].as_str(), e["mcp_name"].as_str()), (Some("mcp.resources/read"), Some("t://1")));
    assert_eq!(m.up.count(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_json_rpc_errors_and_nothing_reaches_the_server() {
    let m = Mcp::start("").await;
    // A tool no rule allows.
    let (status, h, v) = m.post(call(1, "delete_everything", json!({})), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-uapk-decision"], "deny");
    jsonrpc_refusal(&v, 1, "deny", "tool_not_allowed");
    assert_eq!(m.decision(&h)["reasons"][0]["code"], "tool_not_allowed");
    // A counterparty on the deny list, whatever its case.
    let (_, _, v) = m.post(call(2, "refund", json!({"amount": 100, "customer": "CUS_Blocked"})), &[]).await;
    jsonrpc_refusal(&v, 2, "deny", "counterparty_denied");
    // Headers that say another method or tool than the body: real servers route by the body.
    let refund = call(3, "refund", json!({"amount": 100, "customer": "c"}));
    let (_, _, v) = m.post(refund, &[("mcp-name", "read_ticket")]).await;
    jsonrpc_refusal(&v, 3, "deny", "mcp_header_mismatch");
    let (_, _, v) = m.post(call(4, "read_ticket", json!({})), &[("mcp-method", "tools/list")]).await;
    jsonrpc_refusal(&v, 4, "deny", "mcp_header_mismatch");
    // A name given twice is never read as the last one.
    let twice = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"read_ticket","name":"refund","arguments":{"amount":99999}}}"#;
    let (_, _, v) = m.post_raw(twice.into(), &[]).await;
    jsonrpc_refusal(&v, 5, "deny", "param_ambiguous");
    let twice = r#"{"jsonrpc":"2.0","id":6,"method":"tools/list","method":"tools/call","params":{"name":"refund"}}"#;
    let (_, _, v) = m.post_raw(twice.into(), &[]).await;
    jsonrpc_refusal(&v, 6, "deny", "param_ambiguous");
    // A batch is one HTTP request carrying many decisions: refused whole.
    let batch = json!([call(7, "read_ticket", json!({})), call(8, "refund", json!({}))]);
    let (status, _, v) = m.post(batch, &[]).await;
    assert_eq!(status, 400);
    assert_eq!(v["reasons"][0]["code"], "malformed_request");
    // Another path of the connector, another media type.
    let r = client().post(m.gw.base("/tickets/admin")).header("x-uapk-capability", &m.tok).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "route_not_allowed");
    let r = client()
        .post(m.gw.base("/tickets/mcp"))
        .header("x-uapk-capability", &m.tok)
        .header("content-type", "text/plain")
        .body(call(9, "read_ticket", json!({})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(m.up.count(), 0, "a refused request reached the MCP server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_refund_escalates_and_an_override_binds_the_call_not_its_id() {
    const APPROVER: &str = "uapk_test_mcp_approver";
    let keys = admin_keys(&[("ops", APPROVER, "approver")]);
    let m = Mcp::start(&keys).await;
    let big = || json!({"amount": 7500, "customer": "cus_1"});
    let (status, h, v) = m.post(call(1, "refund", big()), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-uapk-decision"], "escalate");
    jsonrpc_refusal(&v, 1, "escalate", "amount_requires_approval");
    let approval = v["error"]["data"]["approval_id"].as_str().expect("the approval id").to_string();
    let over = m.gw.approve(&approval, APPROVER).await.1["override_token"].as_str().unwrap().to_string();
    // Another amount under the same override: not the approved call.
    let other = call(2, "refund", json!({"amount": 9900, "customer": "cus_1"}));
    let (_, _, v) = m.post(other, &[("x-uapk-override", &over)]).await;
    jsonrpc_refusal(&v, 2, "deny", "override_token_invalid");
    assert_eq!(m.up.count(), 0);
    // The approved call, retried with a new JSON-RPC id (as every client does): forwarded once.
    let (status, h, _) = m.post(call(3, "refund", big()), &[("x-uapk-override", &over)]).await;
    assert_eq!(status, 200);
    assert_eq!(m.up.count(), 1);
    let e = m.decision(&h);
    assert_eq!((e["approval_id"].as_str(), e["action"].as_str()), (Some(approval.as_str()), Some("payment.refund")));
    let (_, _, v) = m.post(call(4, "refund", big()), &[("x-uapk-override", &over)]).await;
    jsonrpc_refusal(&v, 4, "deny", "override_token_already_used");
    assert_eq!(m.up.count(), 1);
}

#[test]
fn check_refuses_tools_without_protocol_mcp() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let up: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let bad = mcp_manifest(up, "").replace("    protocol: mcp\n", "");
    std::fs::write(dir.path().join("policies/mcp.yaml"), bad).unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), "policies: policies\n").unwrap();
    let (code, out, err) = run_cli(&["check", "-c", "gateway.yaml"], dir.path());
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("connectors[0].protocol") && err.contains("mcp_path and tools need protocol: mcp"), "{err}");
    std::fs::write(dir.path().join("policies/mcp.yaml"), mcp_manifest(up, "")).unwrap();
    let (code, out, err) = run_cli(&["check", "-c", "gateway.yaml"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
}

/// SPEC §16.3: the `tools/call` POST refuses is not forwarded on another method either. A GET
/// (event stream) or DELETE (end of session) that carries a body — with a length or chunked —
/// is 400 `malformed_request`, recorded with the call its body names; any other method with it
/// is no MCP request (403 `route_not_allowed`). Without a body, GET and DELETE still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_sent_on_another_method_than_post_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = Mcp::start("").await;
    let body = call(1, "delete_ticket", json!({"id": "T-1"})).to_string();
    let (_, h, v) = m.post_raw(body.clone(), &[]).await;
    jsonrpc_refusal(&v, 1, "deny", "tool_not_allowed");
    assert_eq!(m.decision(&h)["mcp_name"], "delete_ticket");
    let send = |method: reqwest::Method| {
        client()
            .request(method, m.gw.base("/tickets/mcp"))
            .header("x-uapk-capability", &m.tok)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.clone())
            .send()
    };
    let sha = sha256_hex(&body);
    let mut records = Vec::new();
    for (method, status, code) in [
        (reqwest::Method::GET, 400, "malformed_request"),
        (reqwest::Method::DELETE, 400, "malformed_request"),
        (reqwest::Method::PUT, 403, "route_not_allowed"),
        (reqwest::Method::PATCH, 403, "route_not_allowed"),
        (reqwest::Method::OPTIONS, 403, "route_not_allowed"),
    ] {
        let r = send(method.clone()).await.unwrap();
        assert_eq!(r.status(), status, "{method}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["reasons"][0]["code"], code, "{method}: {v}");
        let record = v["record"].as_u64().unwrap_or_else(|| panic!("{method}: not recorded: {v}"));
        let e = m.gw.entry(record);
        assert_eq!((e["kind"].as_str(), e["decision"].as_str()), (Some("decision"), Some("deny")), "{method}");
        assert_eq!((e["method"].as_str(), e["path"].as_str()), (Some(method.as_str()), Some("/mcp")), "{method}");
        assert_eq!(e["body_sha256"], sha.as_str(), "{method}: the record holds what the body was: {e}");
        if status == 400 {
            assert_eq!((e["mcp_method"].as_str(), e["mcp_name"].as_str()), (Some("tools/call"), Some("delete_ticket")));
        }
        records.push(record);
    }
    // The same body chunked (no length to read it by): refused unread.
    for method in ["GET", "DELETE"] {
        let mut s = tokio::net::TcpStream::connect(m.gw.proxy).await.unwrap();
        let head = format!(
            "{method} /tickets/mcp HTTP/1.1\r\nHost: gw\r\nx-uapk-capability: {}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            m.tok,
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{method} chunked: {text}");
        assert!(text.contains("malformed_request"), "{text}");
        let record = record_header(&text).unwrap_or_else(|| panic!("{text}"));
        let e = m.gw.entry(record);
        assert_eq!((e["method"].as_str(), e["reasons"][0]["code"].as_str()), (Some(method), Some("malformed_request")));
        records.push(record);
    }
    assert_eq!(m.up.count(), 0, "a smuggled call reached the MCP server");
    records.dedup();
    assert_eq!(records.len(), 7);
    // Without a body, the event stream and the end of a session are session housekeeping.
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let r = client()
            .request(method.clone(), m.gw.base("/tickets/mcp"))
            .header("x-uapk-capability", &m.tok)
            .header("mcp-session-id", "s-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method}");
        let e = m.decision(r.headers());
        assert_eq!((e["action"].as_str(), e["decision"].as_str()), (Some("mcp.session"), Some("allow")), "{method}");
    }
    assert_eq!(m.up.count(), 2);
}
