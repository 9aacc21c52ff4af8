//! The admin listener: health (`/livez`, `/readyz`), Prometheus `/metrics`, and the admin API.

mod metrics;

pub use metrics::{Gauges, Histogram, Metrics};

use crate::proxy::{Gateway, ProxyBody, full_body, json_response};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// State the admin listener reads besides the data path's.
#[derive(Default)]
pub struct Health {
    /// Listeners bound, policy and keys loaded.
    pub ready: std::sync::atomic::AtomicBool,
    /// The last reload error, shown on `/readyz`.
    pub last_reload_error: std::sync::Mutex<Option<String>>,
}

pub async fn handle(gw: Arc<Gateway>, health: Arc<Health>, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/livez") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(&gw, &health),
        (&Method::GET, "/metrics") => {
            let g = gauges(&gw);
            let mut r = text(StatusCode::OK, gw.metrics.render(&g));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

fn gauges(gw: &Gateway) -> Gauges {
    let stats = gw.audit.stats();
    Gauges {
        audit_entries: stats.entries_total,
        audit_queue_depth: gw.audit.queue_depth() as u64,
        audit_last_batch: stats.last_batch_size,
        approvals_pending: gw
            .approvals
            .list(Some(crate::approvals::Status::Pending), crate::proxy::now_unix())
            .map_or(0, |l| l.len() as u64),
        ratelimit_keys: gw.rate_limits.sweep() as u64,
    }
}

fn readyz(gw: &Gateway, health: &Health) -> Response<ProxyBody> {
    let draining = gw.draining.load(Ordering::SeqCst);
    let ready = health.ready.load(Ordering::SeqCst) && !draining;
    let policies = gw.policies.load();
    let body = json!({
        "ready": ready,
        "draining": draining,
        "manifests": policies.set.manifests.len(),
        "last_reload_error": *health.last_reload_error.lock().unwrap_or_else(|e| e.into_inner()),
    });
    json_response(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(full_body(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
