//! Responses the gateway writes itself: the §7 JSON body for every refusal.

use super::ProxyBody;
use crate::policy::Decision;
use crate::response::json_response;
use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

/// Extra fields of a refusal body.
#[derive(Default)]
pub struct DenyBody {
    pub approval_id: Option<String>,
}

/// The one line agent SDKs show for a refusal (SPEC §14.6): `<decision>: <code>: <message>
/// (record N)`; the record part is left out when nothing was recorded (a request refused before
/// it could be identified).
pub fn refusal_message(d: &Decision, record: Option<u64>) -> String {
    let message = d.reasons.first().map_or("", |r| r.message.as_str());
    match record {
        Some(n) => format!("{}: {}: {message} (record {n})", d.verdict.as_str(), d.code()),
        None => format!("{}: {}: {message}", d.verdict.as_str(), d.code()),
    }
}

/// `{"decision","reasons":[{"code","message"}],"record":N,"agent":..,"error":{"type","code",
/// "message"}}` plus `x-uapk-decision`. The `error` object has the shape OpenAI's and
/// Anthropic's SDKs read, so their exceptions carry the reason and the record index.
pub fn deny_response(
    status: StatusCode,
    d: &Decision,
    record: Option<u64>,
    agent: Option<&str>,
    extra: DenyBody,
) -> Response<ProxyBody> {
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
    if let Some(id) = &extra.approval_id {
        body["approval_id"] = json!(id);
    }
    let mut r = json_response(status, &body);
    r.headers_mut().insert("x-uapk-decision", HeaderValue::from_static(d.verdict.as_str()));
    if let Some(i) = record {
        r.headers_mut().insert("x-uapk-record", HeaderValue::from(i));
    }
    r
}
