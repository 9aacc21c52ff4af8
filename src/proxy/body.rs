//! The response body wrapper that counts and hashes what the upstream sends and writes the
//! `outcome` entry when the body ends (or the client goes away).

use super::{BoxError, ProxyBody};
use crate::audit::{AuditHandle, Fields};
use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The fields of a request's access-log line.
pub struct Access {
    pub request_id: String,
    pub agent: String,
    pub connector: String,
    pub action: String,
    pub decision: &'static str,
    pub reasons: String,
    pub started: Instant,
}

/// One JSON access-log line per request (SPEC §13).
pub fn access_line(
    a: &Access,
    status: StatusCode,
    bytes: u64,
    record: Option<u64>,
    upstream: Option<Duration>,
    error: Option<&str>,
) {
    tracing::info!(
        target: "access",
        request_id = %a.request_id,
        agent = %a.agent,
        connector = %a.connector,
        action = %a.action,
        decision = a.decision,
        reasons = %a.reasons,
        status = status.as_u16(),
        bytes,
        duration_ms = a.started.elapsed().as_secs_f64() * 1000.0,
        upstream_ms = upstream.map(|d| d.as_secs_f64() * 1000.0),
        record,
        error,
        "request"
    );
}

/// What the `outcome` entry of a forwarded request needs.
pub struct Outcome {
    pub audit: AuditHandle,
    pub request_id: String,
    /// Index of the request's `decision` entry.
    pub record: u64,
    pub upstream_latency: Duration,
    pub access: Access,
}

impl Outcome {
    /// Queues the `outcome` entry (it follows the response; a full queue is logged, the
    /// decision entry is already durable).
    pub fn write(&self, status: StatusCode, bytes: u64, sha256: Option<String>, error: Option<&str>) {
        let mut f = Fields::new();
        f.str("kind", "outcome")
            .str("request_id", &self.request_id)
            .int("decision_idx", self.record)
            .int("status", status.as_u16())
            .int("bytes", bytes)
            .int("upstream_latency_us", self.upstream_latency.as_micros());
        if let Some(h) = &sha256 {
            f.str("response_sha256", h);
        }
        if let Some(e) = error {
            f.str("error", e);
        }
        if let Err(e) = self.audit.append_fields_nowait(f) {
            tracing::error!(request_id = %self.request_id, error = %e, "outcome entry not queued");
        }
        access_line(&self.access, status, bytes, Some(self.record), Some(self.upstream_latency), error);
    }
}

/// Streams the upstream body through unchanged while counting and hashing it.
pub struct RecordedBody {
    inner: ProxyBody,
    bytes: u64,
    hash: Sha256,
    status: StatusCode,
    outcome: Option<Outcome>,
}

impl RecordedBody {
    pub fn new(inner: ProxyBody, outcome: Outcome, status: StatusCode) -> Self {
        RecordedBody { inner, bytes: 0, hash: Sha256::new(), status, outcome: Some(outcome) }
    }

    fn finish(&mut self, error: Option<&str>) {
        if let Some(o) = self.outcome.take() {
            let hash = std::mem::take(&mut self.hash);
            let sha = error.is_none().then(|| hex::encode(hash.finalize()));
            o.write(self.status, self.bytes, sha, error);
        }
    }
}

impl Body for RecordedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    this.hash.update(d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(Some("the upstream failed mid-response"));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(None);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordedBody {
    fn drop(&mut self) {
        if self.outcome.is_some() {
            if self.inner.is_end_stream() {
                self.finish(None);
            } else {
                self.finish(Some("the client went away before the response ended"));
            }
        }
    }
}
