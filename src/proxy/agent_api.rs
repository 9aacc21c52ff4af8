//! The agent's own endpoints on the proxy listener, under `/uapk/v1/` (never forwarded, always
//! recorded). `GET /uapk/v1/approvals/{id}`: an agent in `reject` mode learns whether its
//! escalation was decided and, once approved, receives the override token to retry with (SPEC
//! §14.7). The caller is identified exactly as for any request; an approval of another agent is
//! answered 404, as for an unknown id.

use super::{App, Facts, ProxyBody, Stop, json_response};
use crate::approvals::{Status, approval_entry};
use crate::clock::now_unix;
use crate::policy::{At, Code, Decision};
use http::{Method, Response, StatusCode};
use serde_json::json;

/// Serves `path` (below `/uapk`) for the identified agent of `facts`.
pub(super) async fn serve(
    gw: &App,
    facts: &mut Facts,
    method: &Method,
    path: &str,
) -> Result<Response<ProxyBody>, Stop> {
    facts.action.name = Some("uapk.approval.read".into());
    let Some(id) = path.strip_prefix("/v1/approvals/").filter(|id| !id.is_empty() && !id.contains('/')) else {
        let d = Decision::deny(Code::RouteNotAllowed, "the gateway serves GET /uapk/v1/approvals/{id} here");
        return Err(Stop::refuse_at(d, At::NoSuchPath));
    };
    if method != Method::GET {
        let d = Decision::deny(Code::RouteNotAllowed, "only GET is served here");
        return Err(Stop::refuse_at(d, At::WrongMethod));
    }
    let found = match gw.approvals().fetch(id).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "reading an approval");
            let d = Decision::deny(Code::ApprovalStoreUnavailable, "the approval store is unavailable");
            return Err(Stop::refuse(d));
        }
    };
    let Some(a) = found.filter(|a| Some(&a.agent) == facts.caller.agent.as_ref()) else {
        let d = Decision::deny(Code::ApprovalNotFound, "no such approval for this agent");
        return Err(Stop::refuse(d));
    };
    let now = now_unix();
    let status = a.status_at(now);
    let mut body = json!({"approval_id": a.id, "status": status.as_str(), "expires_at": a.expires_at});
    let mut jti = None;
    if status == Status::Approved {
        body["expires_at"] = json!(a.override_expires_at);
        if a.override_expires_at.is_some_and(|exp| exp > now) {
            match gw.mint_override(&a, now) {
                Ok((token, j)) => {
                    body["override_token"] = json!(token);
                    jti = Some(j);
                }
                Err(e) => tracing::error!(approval_id = %a.id, error = %e, "minting an override token"),
            }
        }
    }
    let idx = gw.record(facts, &Decision::allow(), Some(&a.id)).await.map_err(Stop::respond)?;
    if let Some(j) = jti {
        let e = approval_entry(
            &a.id,
            "override_issued",
            crate::approvals::BY_GATEWAY,
            Some(&a.agent),
            &[("override_jti", json!(j)), ("record", json!(idx.to_string()))],
        );
        let _ = gw.audit().append_nowait(e);
    }
    gw.finish_metrics(facts, &Decision::allow(), StatusCode::OK, Some(idx));
    let mut resp = json_response(StatusCode::OK, &body);
    resp.headers_mut().insert("x-uapk-record", http::HeaderValue::from(idx));
    Ok(resp)
}
