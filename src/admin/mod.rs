//! The admin listener: health (`/livez`, `/readyz`), Prometheus `/metrics`, and the admin API
//! (SPEC §10, §17). Admin keys are stored as SHA-256 hashes with a role (viewer < auditor <
//! approver < admin: `config::AdminRole`);
//! every approval decision made here is an audit entry, exactly as from any other client.

mod page;
mod stream;

use crate::app::App;
use crate::approvals::{Approval, ApprovalError, Cursor, Status};
use crate::clock::now_unix;
use crate::config::AdminRole;
use crate::metrics::Gauges;
use crate::response::{ProxyBody, full_body, json_response};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// State the admin listener keeps besides the data path's.
#[derive(Default)]
pub struct AdminState {
    /// Listeners bound, policy and keys loaded.
    pub ready: std::sync::atomic::AtomicBool,
    /// The last reload error, shown on `/readyz`.
    pub last_reload_error: std::sync::Mutex<Option<String>>,
    /// When the stored log was last verified (at start) and how many entries it held.
    pub verified: std::sync::Mutex<Option<(String, u64)>>,
    /// Key id of the checkpoint signatures (hex).
    pub key_id: std::sync::Mutex<Option<String>>,
    /// Operator-page sessions.
    pub sessions: page::Sessions,
}

/// Why an admin request is refused: a status and the `{"error": "..."}` body, in one place
/// ([`AdminError::into_response`]).
#[derive(Debug)]
pub(crate) enum AdminError {
    /// 401: no key, an unknown key, or an ended session; `challenge` adds `WWW-Authenticate`.
    Unauthorized { message: &'static str, challenge: bool },
    /// 403: a role too low, or a missing CSRF token.
    Forbidden(String),
    /// 400: a parameter or body that cannot be read.
    BadRequest(String),
    /// 404.
    NotFound(String),
    /// 409: an approval that is no longer pending.
    Conflict(String),
    /// 416: a stream asked to start past the end of the log.
    PastEnd { from: u64, size: u64 },
    /// 503: storage or the approval store does not answer.
    Unavailable(&'static str),
    /// 500.
    Internal,
}

impl AdminError {
    fn forbidden_role(need: AdminRole) -> AdminError {
        AdminError::Forbidden(format!("this needs the {need:?} role").to_lowercase())
    }

    fn bad_request(message: impl Into<String>) -> AdminError {
        AdminError::BadRequest(message.into())
    }

    fn not_found(message: impl Into<String>) -> AdminError {
        AdminError::NotFound(message.into())
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::PastEnd { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The response: the status and `{"error": message}` (416 adds the log's `tree_size`).
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let body = match self {
            AdminError::Unauthorized { message, challenge } => {
                let mut r = json_response(status, &json!({"error": message}));
                if challenge {
                    r.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"uapk-admin\""));
                }
                return r;
            }
            AdminError::Forbidden(m)
            | AdminError::BadRequest(m)
            | AdminError::NotFound(m)
            | AdminError::Conflict(m) => {
                json!({"error": m})
            }
            AdminError::PastEnd { from, size } => json!({
                "error": format!("from {from} is past the end of the log ({size} entries): is this the log you read before?"),
                "tree_size": size,
            }),
            AdminError::Unavailable(m) => json!({"error": m}),
            AdminError::Internal => json!({"error": "internal error"}),
        };
        json_response(status, &body)
    }
}

impl From<ApprovalError> for AdminError {
    fn from(e: ApprovalError) -> AdminError {
        match e {
            ApprovalError::NotFound(_) => AdminError::NotFound(e.to_string()),
            ApprovalError::NotPending { .. } => AdminError::Conflict(e.to_string()),
            ApprovalError::Store(_) => AdminError::Unavailable(APPROVALS_UNAVAILABLE),
        }
    }
}

const APPROVALS_UNAVAILABLE: &str = "the approval store is unavailable";

/// The caller's key id and role (bearer key, or an operator-page session), or the refusal.
fn authorize(
    gw: &App,
    st: &AdminState,
    req: &Request<Incoming>,
    need: AdminRole,
) -> Result<(String, AdminRole), AdminError> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    if bearer.is_none()
        && let Some(sid) = page::session_cookie(req)
    {
        let Some(s) = st.sessions.get(sid) else {
            return Err(AdminError::Unauthorized { message: "the session has ended; sign in again", challenge: false });
        };
        // Cookie-authenticated changes must carry the session's CSRF token in a header that a
        // cross-site form cannot set.
        if req.method() != Method::GET {
            let sent = req.headers().get("x-uapk-csrf").and_then(|v| v.to_str().ok());
            if sent != Some(s.csrf.as_str()) {
                return Err(AdminError::Forbidden("missing or wrong x-uapk-csrf token".into()));
            }
        }
        return if s.role < need { Err(AdminError::forbidden_role(need)) } else { Ok((s.key_id, s.role)) };
    }
    check_key(gw, bearer, need)
}

/// Looks an admin key up by its SHA-256.
fn check_key(gw: &App, presented: Option<&str>, need: AdminRole) -> Result<(String, AdminRole), AdminError> {
    let Some(key) = presented else {
        return Err(AdminError::Unauthorized {
            message: "an admin key is required (Authorization: Bearer <key>)",
            challenge: true,
        });
    };
    let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    // Compare every configured hash without an early exit.
    let mut found = None;
    for k in &gw.config().admin_keys {
        let diff = k.sha256.iter().zip(hash.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            found = Some((k.id.clone(), k.role));
        }
    }
    match found {
        None => Err(AdminError::Unauthorized { message: "unknown admin key", challenge: false }),
        Some((_, role)) if role < need => Err(AdminError::forbidden_role(need)),
        Some(ok) => Ok(ok),
    }
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn read_json<T: for<'de> Deserialize<'de> + Default>(req: Request<Incoming>) -> Result<T, AdminError> {
    let body = Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| AdminError::bad_request("the request body could not be read (64 KiB at most)"))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| AdminError::bad_request(format!("invalid JSON body: {e}")))
}

pub(crate) async fn handle(gw: Arc<App>, st: Arc<AdminState>, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let r = match (&method, segs.as_slice()) {
        (&Method::GET, ["livez"]) => Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET, ["readyz"]) => Ok(readyz(&gw, &st)),
        (&Method::GET, [""]) => Ok(page::asset("index.html")),
        (&Method::GET, ["ui", name]) => Ok(page::asset(name)),
        (&Method::GET, ["metrics"]) => {
            let g = gauges(&gw).await;
            let mut r = text(StatusCode::OK, gw.metrics().render(&g));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            Ok(r)
        }
        (_, ["v1", rest @ ..]) => api(&gw, &st, req, rest).await,
        _ => Err(AdminError::not_found("not found")),
    };
    r.unwrap_or_else(AdminError::into_response)
}

async fn api(
    gw: &Arc<App>,
    st: &AdminState,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response<ProxyBody>, AdminError> {
    let method = req.method().clone();
    match (&method, rest) {
        (&Method::POST, ["session"]) => {
            #[derive(Deserialize, Default)]
            #[serde(deny_unknown_fields)]
            struct SignIn {
                key: String,
            }
            let body: SignIn = read_json(req).await?;
            let (key_id, role) = check_key(gw, Some(body.key.trim()), AdminRole::Viewer)?;
            Ok(st.sessions.open(key_id, role))
        }
        (&Method::GET, ["session"]) => {
            let (key_id, role) = authorize(gw, st, &req, AdminRole::Viewer)?;
            let csrf = page::session_cookie(&req).and_then(|sid| st.sessions.get(sid)).map(|s| s.csrf);
            Ok(json_response(StatusCode::OK, &json!({"key_id": key_id, "role": page::role_name(role), "csrf": csrf})))
        }
        (&Method::POST, ["session", "logout"]) => {
            if let Some(sid) = page::session_cookie(&req) {
                st.sessions.close(sid);
            }
            Ok(page::clear_cookie())
        }
        (&Method::GET, ["status"]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            let verified = st.verified.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "tree_size": gw.audit().tree_size(),
                    "checkpoint": gw.audit().latest_checkpoint(),
                    "verified_at": verified.as_ref().map(|v| v.0.clone()),
                    "verified_entries": verified.map(|v| v.1),
                    "key_id": *st.key_id.lock().unwrap_or_else(|e| e.into_inner()),
                }),
            ))
        }
        (&Method::GET, ["approvals"]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            let status = match query_param(&req, "status").as_deref() {
                None | Some("") => None,
                Some(s) => Some(parse_status(s).ok_or_else(|| AdminError::bad_request("unknown status"))?),
            };
            let limit = match query_param(&req, "limit").as_deref() {
                None | Some("") => 100,
                Some(l) => l
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| AdminError::bad_request("limit must be a number from 1 to 1000"))?,
            };
            let cursor = match query_param(&req, "cursor").as_deref() {
                None | Some("") => None,
                Some(c) => Some(Cursor::parse(c).ok_or_else(|| AdminError::bad_request("invalid cursor"))?),
            };
            let (list, next) = gw.approvals().page(status, limit, cursor).await.map_err(|e| {
                tracing::error!(error = %e, "listing approvals");
                AdminError::Unavailable(APPROVALS_UNAVAILABLE)
            })?;
            let next = next.map(|c| c.to_string());
            Ok(json_response(StatusCode::OK, &json!({"approvals": list, "next_cursor": next})))
        }
        (&Method::GET, ["approvals", id]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            let found = gw.approvals().fetch(id).await.map_err(|e| {
                tracing::error!(error = %e, "reading an approval");
                AdminError::Unavailable(APPROVALS_UNAVAILABLE)
            })?;
            match found {
                Some(a) => Ok(json_response(StatusCode::OK, &approval_view(a))),
                None => Err(AdminError::not_found("no such approval")),
            }
        }
        (&Method::POST, ["approvals", id, action @ ("approve" | "deny")]) => {
            let (key_id, _) = authorize(gw, st, &req, AdminRole::Approver)?;
            #[derive(Deserialize, Default)]
            #[serde(deny_unknown_fields)]
            struct Body {
                ttl: Option<String>,
                note: Option<String>,
            }
            let (id, approve) = (id.to_string(), *action == "approve");
            let body: Body = read_json(req).await?;
            let ttl = match &body.ttl {
                Some(t) => Some(crate::config::parse_duration(t).map_err(AdminError::bad_request)?),
                None => None,
            };
            let override_ttl = match ttl {
                Some(t) => t,
                None => {
                    let agent = gw.approvals().fetch(&id).await.ok().flatten().map(|a| a.agent).unwrap_or_default();
                    gw.policies().load().set.get(&agent).map_or(Duration::from_secs(300), |m| m.escalation.override_ttl)
                }
            };
            let out =
                gw.decide_approval(&id, approve, &key_id, body.note, override_ttl).await.map_err(AdminError::from)?;
            let mut v = approval_view(out.approval);
            if let Some(t) = out.override_token {
                v["override_token"] = json!(t);
            }
            Ok(json_response(StatusCode::OK, &v))
        }
        (&Method::GET, ["records"]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            let num = |k: &str| query_param(&req, k).and_then(|v| v.parse::<u64>().ok());
            let limit = num("limit").unwrap_or(100).clamp(1, 1000) as usize;
            let filter = RecordFilter {
                agent: query_param(&req, "agent").filter(|v| !v.is_empty()),
                decision: query_param(&req, "decision").filter(|v| !v.is_empty()),
                connector: query_param(&req, "connector").filter(|v| !v.is_empty()),
            };
            let size = gw.audit().tree_size();
            // `from` pages forward (oldest first); otherwise newest first, below `before`.
            let (from, before) = (num("from"), num("before").unwrap_or(size).min(size));
            let log = gw.log().clone();
            let records = blocking(move || filter.scan(&log, from, before, limit)).await?;
            Ok(json_response(StatusCode::OK, &json!({"records": records, "tree_size": size})))
        }
        (&Method::GET, ["records", "stream"]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            let from = match query_param(&req, "from").as_deref() {
                None | Some("") => 0,
                Some(v) => v
                    .parse::<u64>()
                    .map_err(|_| AdminError::bad_request("from must be an entry index (a whole number)"))?,
            };
            let follow = match query_param(&req, "follow").as_deref() {
                None | Some("") | Some("true") => true,
                Some("false") => false,
                Some(_) => return Err(AdminError::bad_request("follow must be true or false")),
            };
            stream::response(gw.clone(), from, follow)
                .map_err(|stream::Refused::PastEnd { from, size }| AdminError::PastEnd { from, size })
        }
        (&Method::GET, ["records", idx]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            let idx: u64 = idx.parse().map_err(|_| AdminError::bad_request("index must be a number"))?;
            let log = gw.log().clone();
            let rows = blocking(move || log.entries(idx, 1)).await?;
            match rows.into_iter().find(|(i, _)| *i == idx) {
                Some((_, bytes)) => {
                    let mut r = Response::new(full_body(Bytes::from(bytes)));
                    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Ok(r)
                }
                None => Err(AdminError::not_found("no such record")),
            }
        }
        (&Method::GET, ["proof", kind @ ("inclusion" | "consistency")]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            let num = |k: &str| query_param(&req, k).and_then(|v| v.parse::<u64>().ok());
            let tx = snapshot(gw)?;
            let proof = match *kind {
                "inclusion" => {
                    let index = num("index").ok_or_else(|| AdminError::bad_request("index is required"))?;
                    let size = num("size");
                    blocking(move || crate::audit::proof::inclusion(&tx, index, size)).await
                }
                _ => {
                    let (Some(old), Some(new)) = (num("old"), num("new")) else {
                        return Err(AdminError::bad_request("old and new are required"));
                    };
                    blocking(move || crate::audit::proof::consistency(&tx, old, new)).await
                }
            };
            match proof {
                Ok(p) => Ok(text(StatusCode::OK, p.to_text())),
                Err(_) => {
                    Err(AdminError::bad_request("no such proof: check the index and sizes against the tree size"))
                }
            }
        }
        (&Method::POST, ["export"]) => {
            authorize(gw, st, &req, AdminRole::Auditor)?;
            let num = |k: &str| query_param(&req, k).and_then(|v| v.parse::<u64>().ok());
            let (from, to) = (num("from"), num("to"));
            Ok(export_tar(gw, from, to).await?)
        }
        (&Method::GET, ["checkpoint"]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            match gw.audit().latest_checkpoint() {
                Some(note) => Ok(text(StatusCode::OK, note)),
                None => Err(AdminError::not_found("no checkpoint yet")),
            }
        }
        (&Method::GET, ["manifests"]) => {
            authorize(gw, st, &req, AdminRole::Viewer)?;
            let p = gw.policies().load();
            let list: Vec<Value> = p
                .set
                .manifests
                .values()
                .map(|m| {
                    json!({
                        "agent": m.agent.id, "name": m.agent.name, "sha256": m.sha256,
                        "mode": m.mode.as_str(), "source": m.source.display().to_string(),
                        "connectors": m.connectors.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let err = st.last_reload_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Ok(json_response(StatusCode::OK, &json!({"manifests": list, "last_reload_error": err})))
        }
        _ => Err(AdminError::not_found("not found")),
    }
}

/// Server-side record filters for the API and the operator page.
struct RecordFilter {
    agent: Option<String>,
    decision: Option<String>,
    connector: Option<String>,
}

impl RecordFilter {
    fn matches(&self, v: &Value) -> bool {
        let eq = |k: &str, want: &Option<String>| want.as_ref().is_none_or(|w| v[k].as_str() == Some(w.as_str()));
        eq("agent", &self.agent) && eq("decision", &self.decision) && eq("connector", &self.connector)
    }

    /// Up to `limit` matching entries, looking at no more than 20,000 entries.
    fn scan(
        &self,
        log: &crate::audit::LogReader,
        from: Option<u64>,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Value>, crate::audit::AuditError> {
        const CHUNK: u64 = 500;
        let mut out = Vec::new();
        let mut looked = 0u64;
        match from {
            Some(mut at) => {
                while out.len() < limit && looked < 20_000 && at < before {
                    let rows = log.entries(at, CHUNK as usize)?;
                    let Some(last) = rows.last().map(|r| r.0) else { break };
                    looked += rows.len() as u64;
                    out.extend(
                        rows.iter()
                            .filter_map(|(_, b)| serde_json::from_slice(b).ok())
                            .filter(|v| self.matches(v))
                            .take(limit - out.len()),
                    );
                    at = last + 1;
                }
            }
            None => {
                let mut end = before;
                while out.len() < limit && looked < 20_000 && end > 0 {
                    let start = end.saturating_sub(CHUNK);
                    let rows = log.entries(start, (end - start) as usize)?;
                    looked += end - start;
                    for (_, b) in rows.iter().rev() {
                        if out.len() >= limit {
                            break;
                        }
                        if let Ok(v) = serde_json::from_slice::<Value>(b)
                            && self.matches(&v)
                        {
                            out.push(v);
                        }
                    }
                    end = start;
                }
            }
        }
        Ok(out)
    }
}

fn parse_status(s: &str) -> Option<Status> {
    Some(match s {
        "pending" => Status::Pending,
        "approved" => Status::Approved,
        "denied" => Status::Denied,
        "expired" => Status::Expired,
        "consumed" => Status::Consumed,
        _ => return None,
    })
}

fn approval_view(a: Approval) -> Value {
    let mut v = json!(a);
    if a.status == Status::Pending && a.expires_at <= now_unix() {
        v["status"] = json!("expired");
    }
    v
}

/// The database for one admin read; 503 while the writer reopens it after a storage failure.
/// `POST /v1/export`: the export bundle of one read transaction (a consistent snapshot while the
/// writer goes on), written to a private temporary directory and streamed as a ustar archive.
async fn export_tar(gw: &Arc<App>, from: Option<u64>, to: Option<u64>) -> Result<Response<ProxyBody>, AdminError> {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let snap = snapshot(gw)?;
    let app = gw.clone();
    let nanos = crate::clock::now_unix_nanos();
    // In data_dir: a pod's root file system (and so its /tmp) is read-only.
    let dir = gw.config().data_dir.join(format!(".export-{}-{nanos}", std::process::id()));
    let out = dir.clone();
    let exported = blocking(move || {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&out).map_err(|e| crate::audit::AuditError::Io(e.to_string()))?;
        app.export_bundle(&snap, &out, from, to)
    })
    .await;
    let report = match exported {
        Ok(r) => r,
        Err(resp) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(resp);
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, crate::response::BoxError>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mtime = now_unix().max(0) as u64;
        let send = |b: Vec<u8>| tx.blocking_send(Ok(Frame::data(Bytes::from(b)))).is_ok();
        let fail = |m: String| {
            tracing::error!(error = %m, "export stream failed");
            let _ = tx.blocking_send(Err(m.into()));
        };
        'files: for name in crate::audit::tar::TAR_FILES {
            let path = dir.join(name);
            let opened = std::fs::File::open(&path).and_then(|f| f.metadata().map(|m| (f, m.len())));
            let (mut f, size) = match opened {
                Ok(x) => x,
                Err(e) => {
                    fail(format!("{name}: {e}"));
                    break;
                }
            };
            match crate::audit::tar::header(name, size, mtime) {
                Ok(h) if send(h.to_vec()) => {}
                Ok(_) => break,
                Err(e) => {
                    fail(e.to_string());
                    break;
                }
            }
            let mut left = size;
            while left > 0 {
                let mut buf = vec![0u8; left.min(1 << 16) as usize];
                if let Err(e) = f.read_exact(&mut buf) {
                    fail(format!("{name}: {e}"));
                    break 'files;
                }
                left -= buf.len() as u64;
                if !send(buf) {
                    break 'files;
                }
            }
            if !send(vec![0u8; crate::audit::tar::padding(size)]) {
                break;
            }
        }
        let _ = send(crate::audit::tar::END.to_vec());
        let _ = std::fs::remove_dir_all(&dir);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"uapk-audit-bundle.tar\""));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for (name, v) in [("x-uapk-export-from", report.from), ("x-uapk-export-to", report.to)] {
        if let Ok(v) = HeaderValue::from_str(&v.to_string()) {
            h.insert(name, v);
        }
    }
    Ok(r)
}

/// One consistent snapshot of the log for an admin read; 503 while the writer reopens the file
/// after a storage failure.
fn snapshot(gw: &App) -> Result<redb::ReadTransaction, AdminError> {
    gw.log().read().map_err(|e| {
        tracing::error!(error = %e, "admin storage error");
        AdminError::Unavailable("storage unavailable")
    })
}

async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, AdminError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "admin storage error");
            Err(AdminError::Unavailable("storage unavailable"))
        }
        Err(_) => Err(AdminError::Internal),
    }
}

async fn gauges(gw: &Arc<App>) -> Gauges {
    let stats = gw.audit().stats();
    Gauges {
        audit_entries: stats.entries_total,
        audit_queue_depth: gw.audit().queue_depth() as u64,
        audit_last_batch: stats.last_batch_size,
        audit_commits: stats.commits_total,
        audit_writable: u64::from(!gw.audit().storage_failed()),
        approvals_pending: gw.approvals().pending_total(),
        ratelimit_keys: gw.rate_limits().sweep() as u64,
    }
}

fn readyz(gw: &App, st: &AdminState) -> Response<ProxyBody> {
    let draining = gw.is_draining();
    let audit_writable = !gw.audit().storage_failed();
    let policies = gw.policies().load();
    // A gateway with no valid manifest refuses every request (`manifest_not_found`,
    // `manifest_invalid`): not ready. With at least one it serves those agents.
    // The fleet's database (SPEC §15.4): not ready while it does not answer.
    let state_up = gw.state_up();
    // Redis rate limits unreachable: agents with rate limits are refused (SPEC §15.4).
    let rate_limits = gw.rate_limits().available();
    let ready = st.ready.load(Ordering::SeqCst)
        && !draining
        && audit_writable
        && state_up
        && rate_limits
        && !policies.set.manifests.is_empty();
    let invalid: Vec<Value> =
        policies.set.invalid.iter().map(|i| json!({"file": i.file.display().to_string(), "agent": i.agent})).collect();
    let body = json!({
        "ready": ready,
        "draining": draining,
        "audit_writable": audit_writable,
        "state": state_up,
        "rate_limits": rate_limits,
        "manifests": policies.set.manifests.len(),
        "invalid_manifests": invalid,
        "last_reload_error": *st.last_reload_error.lock().unwrap_or_else(|e| e.into_inner()),
    });
    json_response(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(full_body(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
