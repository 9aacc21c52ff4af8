//! The response body wrapper that counts and hashes what the upstream sends and writes the
//! `outcome` entry when the body ends (or the client goes away). For a connector with `usage`
//! it also reads the response's LLM token usage as it passes ([`crate::usage`]), records it in
//! the outcome entry and counts it toward token budgets.

use super::{BoxError, ProxyBody};
use crate::audit::{AuditHandle, Fields};
use crate::config::UsageFormat;
use crate::limits::{Budgets, TokenCounter, TokenUse};
use crate::usage::{Usage, UsageParser};
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
    /// Set for a connector with `usage`: the response's token usage is read and recorded.
    pub usage: Option<UsageHook>,
}

/// How a usage connector's outcome reads and counts tokens.
pub struct UsageHook {
    format: UsageFormat,
    counter: TokenCounter,
}

impl UsageHook {
    /// The hook for a connector's `usage` setting (none without one).
    pub fn new(format: Option<UsageFormat>, budgets: &Budgets) -> Option<UsageHook> {
        format.map(|format| UsageHook { format, counter: budgets.token_counter() })
    }
}

impl Outcome {
    /// Queues the `outcome` entry (it follows the response; a full queue is logged, the
    /// decision entry is already durable).
    pub fn write(&self, status: StatusCode, bytes: u64, sha256: Option<String>, error: Option<&str>) {
        self.write_with_usage(status, bytes, sha256, error, None);
    }

    /// `write`, with the usage read from the response body (`None`: no body was read). For a
    /// usage connector the entry carries `usage` (or `usage: null` and `usage_error`) and the
    /// agent, connector and action the tokens count toward; the tokens are counted once the
    /// entry is handed to the log, so what counts is exactly what a rebuild reads back
    /// (`limits::recorded_spend`).
    pub fn write_with_usage(
        &self,
        status: StatusCode,
        bytes: u64,
        sha256: Option<String>,
        error: Option<&str>,
        usage: Option<Result<Usage, String>>,
    ) {
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
        let mut tokens = None;
        if self.usage.is_some() {
            let a = &self.access;
            f.str("agent", &a.agent).str("connector", &a.connector).str("action", &a.action);
            let usage = usage.unwrap_or_else(|| Err("no response body was read".into()));
            let value = match &usage {
                Ok(u) => u.to_json(),
                Err(_) => serde_json::Value::Null,
            };
            match f.value("usage", &value) {
                // Only what the entry records counts (a rebuild reads the entry).
                Ok(_) => tokens = crate::limits::usage_tokens(&value),
                Err(e) => tracing::error!(request_id = %self.request_id, error = %e, "usage not recordable"),
            }
            if let Err(e) = &usage {
                f.str("usage_error", e);
            }
        }
        match self.audit.append_fields_nowait(f) {
            Ok(()) => {
                if let (Some(hook), Some(tokens)) = (&self.usage, tokens) {
                    let a = &self.access;
                    hook.counter.record(&TokenUse {
                        agent: a.agent.clone(),
                        connector: a.connector.clone(),
                        action: a.action.clone(),
                        tokens,
                        at: time::OffsetDateTime::now_utc().unix_timestamp(),
                    });
                }
            }
            Err(e) => {
                tracing::error!(request_id = %self.request_id, error = %e, "outcome entry not queued");
            }
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
    /// Reads token usage as the body passes (usage connectors only).
    usage: Option<UsageParser>,
}

impl RecordedBody {
    /// Wraps the body of the response whose head is `head` (its status, and for usage
    /// connectors its content type and encoding).
    pub fn new(inner: ProxyBody, outcome: Outcome, head: &http::response::Parts) -> Self {
        let usage = outcome.usage.as_ref().map(|u| UsageParser::new(u.format, &head.headers));
        RecordedBody { inner, bytes: 0, hash: Sha256::new(), status: head.status, outcome: Some(outcome), usage }
    }

    fn finish(&mut self, error: Option<&str>) {
        if let Some(o) = self.outcome.take() {
            let hash = std::mem::take(&mut self.hash);
            let sha = error.is_none().then(|| hex::encode(hash.finalize()));
            let usage = self.usage.take().map(UsageParser::finish);
            o.write_with_usage(self.status, self.bytes, sha, error, usage);
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
                    if let Some(p) = &mut this.usage {
                        p.feed(d);
                    }
                    // Written before the last bytes are handed on: an agent that has read them
                    // and sends its next request finds this one's tokens counted. A stream's
                    // final event ends it too, as SDKs may stop reading there.
                    if this.inner.is_end_stream() || this.usage.as_ref().is_some_and(UsageParser::stream_done) {
                        this.finish(None);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // (A stream whose final event passed is already recorded as complete.)
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
