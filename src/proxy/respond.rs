//! Responses the gateway writes itself: the §7 JSON body for every refusal.

use super::ProxyBody;
use crate::policy::Decision;
use crate::response::json_response;
use http::{HeaderValue, Response, StatusCode};
use serde_json::{Value, json};

/// Extra fields of a refusal body.
#[derive(Default)]
pub(super) struct DenyBody {
    pub approval_id: Option<String>,
}

/// The one line agent SDKs show for a refusal (SPEC §14.6): `<decision>: <code>: <message>
/// (record N)`; the record part is left out when nothing was recorded (a request refused before
/// it could be identified).
pub(super) fn refusal_message(d: &Decision, record: Option<u64>) -> String {
    let message = d.reasons.first().map_or("", |r| r.message.as_str());
    match record {
        Some(n) => format!("{}: {}: {message} (record {n})", d.verdict.as_str(), d.code()),
        None => format!("{}: {}: {message}", d.verdict.as_str(), d.code()),
    }
}

/// `{"decision","reasons":[{"code","message"}],"record":N,"agent":..,"error":{"type","code",
/// "message"}}` plus `x-uapk-decision`. The `error` object has the shape OpenAI's and
/// Anthropic's SDKs read, so their exceptions carry the reason and the record index.
pub(super) fn deny_response(
    status: StatusCode,
    d: &Decision,
    record: Option<u64>,
    agent: Option<&str>,
    extra: DenyBody,
) -> Response<ProxyBody> {
    let body = refusal_body(d, record, agent, extra.approval_id.as_deref());
    let mut r = json_response(status, &body);
    decision_headers(&mut r, d, record);
    r
}

/// The §7 body of a refusal, with the §14.6 `error` object.
fn refusal_body(d: &Decision, record: Option<u64>, agent: Option<&str>, approval_id: Option<&str>) -> Value {
    let mut body = json!({
        "decision": d.verdict.as_str(),
        "reasons": d.reasons,
        "record": record,
        "agent": agent,
        "error": {
            "type": format!("uapk_{}", d.verdict.as_str()),
            "code": d.code(),
            "message": refusal_message(d, record),
        },
    });
    if let Some(id) = approval_id {
        body["approval_id"] = json!(id);
    }
    body
}

fn decision_headers(r: &mut Response<ProxyBody>, d: &Decision, record: Option<u64>) {
    r.headers_mut().insert("x-uapk-decision", HeaderValue::from_static(d.verdict.as_str()));
    if let Some(i) = record {
        r.headers_mut().insert("x-uapk-record", HeaderValue::from(i));
    }
}

/// A refused JSON-RPC request (MCP, SPEC §14.4): HTTP 200 with a JSON-RPC error whose message is
/// the one-line refusal and whose `data` is the §7 body, so MCP clients show why; the
/// `x-uapk-*` headers are those of any refusal.
pub(super) fn jsonrpc_refusal(
    id: &Value,
    d: &Decision,
    record: Option<u64>,
    agent: Option<&str>,
    extra: DenyBody,
) -> Response<ProxyBody> {
    let body = json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": -32003,
            "message": refusal_message(d, record),
            "data": refusal_body(d, record, agent, extra.approval_id.as_deref()),
        },
    });
    let mut r = json_response(StatusCode::OK, &body);
    decision_headers(&mut r, d, record);
    r
}
