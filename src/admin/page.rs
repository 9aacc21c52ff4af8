//! The operator page: static assets compiled into the binary (the pod has no internet), served
//! under a strict Content-Security-Policy, and server-side sessions whose id lives in an
//! `HttpOnly`, `SameSite=Strict` cookie. The admin key itself is never stored in the browser.

use super::json_response;
use crate::config::AdminRole;
use crate::response::{ProxyBody, full_body};
use http::{HeaderValue, Request, Response, StatusCode, header};
use rand::RngCore;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
const MAX_SESSIONS: usize = 1024;

/// A signed-in operator.
#[derive(Clone)]
pub(crate) struct Session {
    pub key_id: String,
    pub role: AdminRole,
    /// Sent back in `x-uapk-csrf` on every change.
    pub csrf: String,
    expires: Instant,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Sessions {
    pub(crate) fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(s) if s.expires > crate::clock::instant() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Opens a session and answers with its cookie and CSRF token.
    pub(crate) fn open(&self, key_id: String, role: AdminRole) -> Response<ProxyBody> {
        let (id, csrf) = (random_token(), random_token());
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = crate::clock::instant();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            // Drop the session closest to expiry.
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        let session = Session { key_id: key_id.clone(), role, csrf: csrf.clone(), expires: now + SESSION_TTL };
        map.insert(id.clone(), session);
        let mut r = json_response(StatusCode::OK, &json!({"key_id": key_id, "role": role_name(role), "csrf": csrf}));
        let cookie = format!("uapk_session={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}", SESSION_TTL.as_secs());
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    pub(crate) fn close(&self, id: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

pub(super) fn role_name(r: AdminRole) -> &'static str {
    match r {
        AdminRole::Viewer => "viewer",
        AdminRole::Auditor => "auditor",
        AdminRole::Approver => "approver",
        AdminRole::Admin => "admin",
    }
}

pub(super) fn clear_cookie() -> Response<ProxyBody> {
    let mut r = json_response(StatusCode::OK, &json!({"signed_out": true}));
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("uapk_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// The session id from the request's cookie.
pub(super) fn session_cookie<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("uapk_session="))
        .filter(|v| !v.is_empty())
}

/// One of the page's files, with the security headers.
pub(super) fn asset(name: &str) -> Response<ProxyBody> {
    let (body, ctype) = match name {
        "index.html" => (INDEX, "text/html; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return super::AdminError::not_found("not found").into_response(),
    };
    let mut r = Response::new(full_body(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
