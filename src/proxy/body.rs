//! The response body wrapper that counts and hashes what the upstream sends and writes the
//! `outcome` entry when the body ends (or the client goes away); the request body wrapper that
//! hashes a streamed request body as it passes to the upstream, for that `outcome` entry; and,
//! for a connector with `usage`, the response's LLM token usage read as it passes
//! ([`crate::usage`]), recorded in the outcome entry and charged to token budgets: the usage
//! read, else the call's estimate (SPEC §16.1). When the agent goes away mid-response, an LLM
//! response is read on (bounded in time and bytes) to learn its usage. And the stall deadline of
//! a streamed request body ([`StallCut`], `limits.body_read_timeout`).

use super::{BoxError, ProxyBody};
use crate::audit::{AuditHandle, Fields};
use crate::config::{USAGE_DRAIN_MAX_BYTES, UsageFormat};
use crate::limits::{Settlement, TokenUse};
use crate::policy::Code;
use crate::telemetry::{SpanFacts, UpstreamSpan};
use crate::usage::{Usage, UsageParser};
use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The fields of a request's access-log line.
pub(crate) struct Access {
    pub request_id: String,
    pub agent: String,
    pub connector: String,
    pub action: String,
    pub decision: &'static str,
    pub reasons: String,
    pub started: Instant,
    pub trace: crate::telemetry::RequestTrace,
}

impl Access {
    fn span_facts<'a>(&'a self, status: StatusCode, record: Option<u64>, error: Option<&'a str>) -> SpanFacts<'a> {
        SpanFacts {
            request_id: &self.request_id,
            agent: &self.agent,
            connector: &self.connector,
            action: &self.action,
            decision: self.decision,
            reasons: &self.reasons,
            record,
            status: status.as_u16(),
            error,
        }
    }

    /// Ends the request's span (telemetry on) with what was decided and answered.
    pub(crate) fn finish_span(&self, status: StatusCode, record: Option<u64>, error: Option<&str>) {
        self.trace.finish(&self.span_facts(status, record, error));
    }

    /// Ends the span of the upstream call with the upstream's answer (or failure).
    pub(crate) fn finish_upstream(&self, span: UpstreamSpan, status: StatusCode, record: u64, error: Option<&str>) {
        span.finish(&self.span_facts(status, Some(record), error));
    }
}

/// One JSON access-log line per request (SPEC §13).
pub(super) fn access_line(
    a: &Access,
    status: StatusCode,
    bytes: u64,
    record: Option<u64>,
    upstream: Option<Duration>,
    error: Option<&str>,
) {
    a.finish_span(status, record, error);
    tracing::info!(
        target: "access",
        request_id = %a.request_id,
        trace_id = a.trace.trace_id(),
        agent = %a.agent,
        connector = %a.connector,
        action = %a.action,
        decision = a.decision,
        reasons = %a.reasons,
        status = status.as_u16(),
        bytes,
        duration_ms = crate::clock::since(a.started).as_secs_f64() * 1000.0,
        upstream_ms = upstream.map(|d| d.as_secs_f64() * 1000.0),
        record,
        error,
        "request"
    );
}

/// What the `outcome` entry of a forwarded request needs.
pub(crate) struct Outcome {
    pub audit: AuditHandle,
    pub request_id: String,
    /// Index of the request's `decision` entry.
    pub record: u64,
    pub upstream_latency: Duration,
    pub access: Access,
    /// The streamed request body's digest (`None` when it was buffered and hashed in the
    /// decision entry, or `audit.bodies: none`).
    pub request_body: Option<RequestDigest>,
    /// Set for a connector with `usage`: the response's token usage is read and recorded.
    pub usage: Option<UsageHook>,
    /// Set when the streamed request body was cut for stalling (`request_body_error`).
    pub body_stalled: Option<Stalled>,
}

/// How a usage connector's outcome reads and charges tokens.
pub(crate) struct UsageHook {
    format: UsageFormat,
    budgets: crate::state::BudgetStore,
    /// What the call reserved: charged when its usage cannot be read.
    estimate: u64,
    /// How long the response is read on after the agent went away.
    drain_timeout: Duration,
}

impl UsageHook {
    /// The hook for a connector's `usage` setting (none without one), charging `estimate` when
    /// the usage cannot be read.
    pub(crate) fn new(
        format: Option<UsageFormat>,
        budgets: &crate::state::BudgetStore,
        estimate: u64,
        drain_timeout: Duration,
    ) -> Option<UsageHook> {
        format.map(|format| UsageHook { format, budgets: budgets.clone(), estimate, drain_timeout })
    }
}

/// What was learnt of an LLM response's usage.
pub(crate) enum UsageRead {
    /// The request never reached the upstream (connecting failed): nothing to charge.
    Unsent,
    /// No response body was read (an upstream error or timeout after sending).
    NoBody,
    /// Read from the body: the usage or why it is unknown, and the tokens seen so far (the floor
    /// of the charge for a response cut short).
    Body(Result<Usage, String>, u64),
}

impl Outcome {
    /// Queues the `outcome` entry (it follows the response; a full queue is logged, the
    /// decision entry is already durable).
    pub(crate) fn write(&self, status: StatusCode, bytes: u64, sha256: Option<String>, error: Option<&str>) {
        self.write_with_usage(status, bytes, sha256, error, UsageRead::NoBody);
    }

    /// `write`, with what was learnt of the usage. For a usage connector the entry carries
    /// `usage` (or `usage: null` and `usage_error`), `usage_charged` (the usage's total, else the
    /// call's estimate: never 0 for a call that was sent) and the agent, connector and action the
    /// tokens count toward; the call's reservation settles to `usage_charged`, exactly what a
    /// rebuild reads back (`limits::recorded_spend`).
    pub(crate) fn write_with_usage(
        &self,
        status: StatusCode,
        bytes: u64,
        sha256: Option<String>,
        error: Option<&str>,
        usage: UsageRead,
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
        if let Some(d) = &self.request_body {
            d.write_fields(&mut f);
        }
        if self.body_stalled.as_ref().is_some_and(Stalled::get) {
            f.str("request_body_error", Code::BodyTimeout.as_str());
        }
        let mut charged = None;
        if let Some(hook) = &self.usage {
            let a = &self.access;
            f.str("agent", &a.agent).str("connector", &a.connector).str("action", &a.action);
            let (usage, floor, sent) = match usage {
                UsageRead::Unsent => (Err("the request did not reach the upstream".to_string()), 0, false),
                UsageRead::NoBody => (Err("no response body was read".to_string()), 0, true),
                UsageRead::Body(u, seen) => (u, seen, true),
            };
            let value = match &usage {
                Ok(u) => u.to_json(),
                Err(_) => serde_json::Value::Null,
            };
            if let Err(e) = f.value("usage", &value) {
                tracing::error!(request_id = %self.request_id, error = %e, "usage not recordable");
            }
            if let Err(e) = &usage {
                f.str("usage_error", e);
            }
            let tokens = if sent {
                crate::limits::token_charge(usage.as_ref().ok().map(|u| u.total_tokens), hook.estimate.max(floor))
            } else {
                0
            };
            f.int("usage_charged", tokens);
            charged = Some(tokens);
        }
        if let Err(e) = self.audit.append_fields_nowait(f) {
            tracing::error!(request_id = %self.request_id, error = %e, "outcome entry not queued");
        }
        if let (Some(hook), Some(tokens)) = (&self.usage, charged) {
            // Settled also when the entry could not be queued: the budget holds the charge
            // rather than forget a call that was sent.
            let a = &self.access;
            let used = TokenUse {
                agent: a.agent.clone(),
                connector: a.connector.clone(),
                action: a.action.clone(),
                tokens,
                at: crate::clock::now_utc().unix_timestamp(),
            };
            hook.budgets.settle_later(&self.request_id, Settlement::Tokens(used));
        }
        access_line(&self.access, status, bytes, Some(self.record), Some(self.upstream_latency), error);
    }
}

/// Streams the upstream body through unchanged while counting and hashing it.
pub(crate) struct RecordedBody {
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
    pub(crate) fn new(inner: ProxyBody, outcome: Outcome, head: &http::response::Parts) -> Self {
        let usage = outcome.usage.as_ref().map(|u| UsageParser::new(u.format, &head.headers));
        RecordedBody { inner, bytes: 0, hash: Sha256::new(), status: head.status, outcome: Some(outcome), usage }
    }

    fn finish(&mut self, error: Option<&str>) {
        if let Some(o) = self.outcome.take() {
            let hash = std::mem::take(&mut self.hash);
            let sha = error.is_none().then(|| hex::encode(hash.finalize()));
            let usage = match self.usage.take() {
                Some(p) => read_usage(p, error),
                None => UsageRead::NoBody,
            };
            o.write_with_usage(self.status, self.bytes, sha, error, usage);
        }
    }

    /// The agent went away mid-response: an LLM response whose usage is still being read is read
    /// on in a task of its own (at most `limits.usage_drain_timeout` and 1 MiB, nothing more is
    /// sent to the agent), then the outcome is written. Anything else is written now.
    fn abandon(&mut self) {
        const GONE: &str = "the client went away before the response ended";
        let drain = self.outcome.as_ref().and_then(|o| o.usage.as_ref()).map(|h| h.drain_timeout);
        let reading = self.usage.as_ref().is_some_and(UsageParser::is_reading);
        if let (Some(timeout), true, Ok(handle)) = (drain, reading, tokio::runtime::Handle::try_current())
            && let (Some(parser), Some(outcome)) = (self.usage.take(), self.outcome.take())
        {
            let inner = std::mem::replace(&mut self.inner, super::full_body(Bytes::new()));
            let (status, bytes) = (self.status, self.bytes);
            handle.spawn(async move {
                let (parser, why) = drain_usage(inner, parser, timeout).await;
                let usage = read_usage(parser, why.as_deref().or(Some(GONE)));
                outcome.write_with_usage(status, bytes, None, Some(GONE), usage);
            });
            return;
        }
        self.finish(Some(GONE));
    }
}

/// The usage of a response body read by `p`; `cut` says why the body did not end, if it did
/// not. The usage of an event stream cut before its final event is unknown (its counts may be
/// partial); what it showed so far is the floor of the charge.
fn read_usage(p: UsageParser, cut: Option<&str>) -> UsageRead {
    let seen = p.seen_so_far();
    match cut {
        Some(why) if p.stream_unfinished() => {
            UsageRead::Body(Err(format!("the stream ended before its final event ({why})")), seen)
        }
        _ => UsageRead::Body(p.finish(), seen),
    }
}

/// Reads the rest of an LLM response nobody receives any more, feeding `parser`, until the
/// stream's final event, the body's end, `timeout` or [`USAGE_DRAIN_MAX_BYTES`]; returns the
/// parser and why it stopped early (`None`: the body or stream ended).
async fn drain_usage(mut body: ProxyBody, mut parser: UsageParser, timeout: Duration) -> (UsageParser, Option<String>) {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut read = 0u64;
    while !parser.stream_done() {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return (parser, Some("limits.usage_drain_timeout passed while reading on".into())),
            Ok(None) => return (parser, None),
            Ok(Some(Err(_))) => return (parser, Some("the upstream failed mid-response".into())),
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let room = usize::try_from(USAGE_DRAIN_MAX_BYTES - read).unwrap_or(usize::MAX);
                    parser.feed(&d[..d.len().min(room)]);
                    read += d.len().min(room) as u64;
                    if read >= USAGE_DRAIN_MAX_BYTES {
                        return (parser, Some("1 MiB read on without the usage".into()));
                    }
                }
            }
        }
    }
    (parser, None)
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
                self.abandon();
            }
        }
    }
}

/// What a streamed request body's wrapper has seen so far: SHA-256 and length of every byte
/// handed to the upstream connection, whether the body ended, and (with `audit.bodies: full` on
/// a `safe` route) its first bytes.
#[derive(Clone)]
pub(crate) struct RequestDigest(Arc<Mutex<DigestState>>);

struct DigestState {
    hash: Sha256,
    len: u64,
    complete: bool,
    /// Up to `MAX_STRING_BYTES + 1` first bytes, kept only with `audit.bodies: full`.
    prefix: Option<Vec<u8>>,
}

impl RequestDigest {
    /// A digest; `keep_prefix` for a body recorded in full (`audit.bodies: full`, safe route).
    pub(crate) fn new(keep_prefix: bool) -> RequestDigest {
        RequestDigest(Arc::new(Mutex::new(DigestState {
            hash: Sha256::new(),
            len: 0,
            complete: false,
            prefix: keep_prefix.then(Vec::new),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DigestState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, data: &[u8]) {
        let mut s = self.state();
        s.hash.update(data);
        s.len += data.len() as u64;
        if let Some(p) = &mut s.prefix {
            let room = (crate::audit::canonical::MAX_STRING_BYTES + 1).saturating_sub(p.len());
            p.extend_from_slice(&data[..room.min(data.len())]);
        }
    }

    fn complete(&self) {
        self.state().complete = true;
    }

    /// The `outcome` entry's `request_body_sha256` and `request_body_len` (of what was sent so
    /// far, with `request_body_complete: false` if the body had not ended), for a body with
    /// content; with a kept prefix, `request_body` too.
    pub(crate) fn write_fields(&self, f: &mut Fields) {
        let s = self.state();
        if s.len == 0 {
            return;
        }
        let sha = s.hash.clone().finalize();
        f.str("request_body_sha256", &hex::encode(sha)).int("request_body_len", s.len);
        if !s.complete {
            f.put_bool("request_body_complete", false);
        }
        if let Some(p) = &s.prefix {
            record_full_body(f, "request_body", p, sha.into(), s.len);
        }
    }
}

/// The body text recorded with `audit.bodies: full` under `key` (`prefix` holds its first bytes,
/// at least `MAX_STRING_BYTES + 1` of them when it is longer): in full up to the string limit,
/// else cut like any long string, with the body's own SHA-256 and length in `truncated`. A body
/// that is not UTF-8 text is not recorded (its hash is).
pub(super) fn record_full_body(f: &mut Fields, key: &'static str, prefix: &[u8], sha256: [u8; 32], len: u64) {
    use crate::audit::canonical::{CUT_STRING_BYTES, MAX_STRING_BYTES};
    if len as usize <= MAX_STRING_BYTES && prefix.len() as u64 == len {
        if let Ok(text) = std::str::from_utf8(prefix) {
            f.str(key, text);
        }
        return;
    }
    // Only the first bytes count: a character cut at the end of the prefix is not an error.
    let head = &prefix[..prefix.len().min(CUT_STRING_BYTES + 4)];
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default(),
        Err(_) => return,
    };
    f.cut_str(key, crate::audit::canonical::utf8_prefix(text, CUT_STRING_BYTES), sha256, len);
}

/// Streams a request body to the upstream unchanged (no buffering, no copy) while hashing each
/// data frame into its `RequestDigest`, which the `outcome` entry reads when the response ends.
pub(super) struct HashedBody {
    inner: ProxyBody,
    digest: RequestDigest,
}

impl HashedBody {
    pub(super) fn new(inner: ProxyBody, digest: RequestDigest) -> HashedBody {
        HashedBody { inner, digest }
    }
}

impl Body for HashedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.digest.update(d);
                }
                if this.inner.is_end_stream() {
                    this.digest.complete();
                }
            }
            Poll::Ready(None) => this.digest.complete(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.digest.complete();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a [`StallCut`] cut its body; shared with the `outcome` entry.
#[derive(Clone, Default)]
pub(crate) struct Stalled(Arc<std::sync::atomic::AtomicBool>);

impl Stalled {
    pub(crate) fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The error a stalled request body ends with: the upstream request is aborted.
#[derive(Debug)]
pub(super) struct BodyStalled(pub Duration);

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body sent nothing for {:?} (limits.body_read_timeout)", self.0)
    }
}

impl std::error::Error for BodyStalled {}

/// Streams a request body to the upstream, and fails it (so the upstream request is aborted
/// mid-body) when the client sends nothing for `timeout` while the gateway waits for it: a
/// client that stops sending cannot hold an upstream request, and its slot, forever. Time the
/// upstream takes to accept bytes (the body is not polled then) does not count. The timer is
/// armed only when the body waits.
pub(super) struct StallCut {
    inner: ProxyBody,
    timeout: Duration,
    /// Waiting for the client since the last frame (the timer runs).
    waiting: bool,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: Stalled,
    done: bool,
}

impl StallCut {
    pub(super) fn new(inner: ProxyBody, timeout: Duration, stalled: Stalled) -> StallCut {
        StallCut { inner, timeout, waiting: false, timer: None, stalled, done: false }
    }
}

impl Body for StallCut {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {}
            ready => {
                this.waiting = false;
                return ready;
            }
        }
        let deadline = tokio::time::Instant::now() + this.timeout;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !this.waiting {
            this.waiting = true;
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.done = true;
                this.stalled.0.store(true, std::sync::atomic::Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(BodyStalled(this.timeout)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod request_digest_tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use serde_json::Value;

    /// A body whose frames the test sends.
    fn channel() -> (tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>, ProxyBody) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let frames = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        (tx, StreamBody::new(frames).boxed_unsync())
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_cut_and_one_that_trickles_is_not() {
        let timeout = Duration::from_millis(300);
        // Two bytes, then nothing: cut after the timeout.
        let (tx, rx) = channel();
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab")))).unwrap();
        let stalled = Stalled::default();
        let mut body = StallCut::new(rx, timeout, stalled.clone());
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "ab");
        let started = crate::clock::instant();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyStalled>(), "{err}");
        assert!(
            crate::clock::since(started) >= timeout && crate::clock::since(started) < timeout * 4,
            "{:?}",
            crate::clock::since(started)
        );
        assert!(stalled.get() && body.frame().await.is_none());
        drop(tx);
        // A frame every 100 ms under a 300 ms timeout, for longer than the timeout: never cut.
        let (tx, rx) = channel();
        let stalled = Stalled::default();
        let body = StallCut::new(rx, timeout, stalled.clone());
        tokio::spawn(async move {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).unwrap();
            }
        });
        assert_eq!(body.collect().await.unwrap().to_bytes(), "xxxxxxxx");
        assert!(!stalled.get());
    }

    fn frames(parts: &[&'static [u8]]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p)))).collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    fn recorded(d: &RequestDigest) -> Value {
        let mut f = Fields::new();
        d.write_fields(&mut f);
        let mut out = Vec::new();
        f.join(&[], &mut out);
        serde_json::from_slice(&out).unwrap()
    }

    #[tokio::test]
    async fn frames_pass_unchanged_and_are_hashed() {
        let d = RequestDigest::new(false);
        let got = HashedBody::new(frames(&[b"hello ", b"", b"world"]), d.clone()).collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello world");
        let v = recorded(&d);
        assert_eq!(v["request_body_sha256"], hex::encode(Sha256::digest(b"hello world")));
        assert_eq!(v["request_body_len"], "11");
        assert!(v.get("request_body_complete").is_none() && v.get("request_body").is_none(), "{v}");
    }

    #[tokio::test]
    async fn a_body_cut_off_is_recorded_as_sent_and_incomplete() {
        let d = RequestDigest::new(false);
        let mut body = HashedBody::new(frames(&[b"abc", b"def"]), d.clone());
        body.frame().await.unwrap().unwrap();
        drop(body);
        let v = recorded(&d);
        assert_eq!(v["request_body_sha256"], hex::encode(Sha256::digest(b"abc")));
        assert_eq!(v["request_body_len"], "3");
        assert_eq!(v["request_body_complete"], false);
    }

    #[tokio::test]
    async fn an_empty_body_records_nothing() {
        let d = RequestDigest::new(true);
        HashedBody::new(frames(&[]), d.clone()).collect().await.unwrap();
        assert_eq!(recorded(&d), serde_json::json!({}));
    }

    #[tokio::test]
    async fn a_full_body_keeps_only_a_bounded_prefix_and_is_cut_with_its_own_hash() {
        static BIG: [u8; 3000] = [b'x'; 3000];
        let d = RequestDigest::new(true);
        HashedBody::new(frames(&[&BIG[..1000], &BIG[1000..]]), d.clone()).collect().await.unwrap();
        assert_eq!(d.state().prefix.as_ref().map(Vec::len), Some(crate::audit::canonical::MAX_STRING_BYTES + 1));
        let v = recorded(&d);
        assert_eq!(v["request_body"], format!("{}…", "x".repeat(256)).as_str());
        assert_eq!(v["truncated"]["request_body"]["sha256"], hex::encode(Sha256::digest(BIG)));
        assert_eq!(v["truncated"]["request_body"]["len"], "3000");
        // Short text is kept whole; bytes that are not UTF-8 only hashed.
        let d = RequestDigest::new(true);
        HashedBody::new(frames(&[b"{\"a\":", b"1}"]), d.clone()).collect().await.unwrap();
        assert_eq!(recorded(&d)["request_body"], "{\"a\":1}");
        let d = RequestDigest::new(true);
        HashedBody::new(frames(&[b"\xff\xfe"]), d.clone()).collect().await.unwrap();
        let v = recorded(&d);
        assert!(v.get("request_body").is_none() && v["request_body_len"] == "2", "{v}");
    }
}

#[cfg(test)]
mod access_line_tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    /// The access line carries the caller's trace id (a valid `traceparent`), and none without one.
    #[test]
    fn access_line_carries_the_trace_id_when_one_is_known() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let line = |traceparent: Option<&str>| -> serde_json::Value {
            let buf = Buf::default();
            let writer = buf.clone();
            let subscriber =
                tracing_subscriber::fmt().json().flatten_event(true).with_writer(move || writer.clone()).finish();
            let mut h = HeaderMap::new();
            if let Some(t) = traceparent {
                h.insert("traceparent", HeaderValue::from_str(t).unwrap());
            }
            let access = Access {
                request_id: "r1".into(),
                agent: "a".into(),
                connector: "c".into(),
                action: "x.read".into(),
                decision: "allow",
                reasons: "all_checks_passed".into(),
                started: crate::clock::instant(),
                trace: crate::telemetry::Telemetry::off().start_request(&h, "GET"),
            };
            tracing::subscriber::with_default(subscriber, || {
                access_line(&access, http::StatusCode::OK, 5, Some(7), None, None)
            });
            let out = buf.0.lock().unwrap().clone();
            serde_json::from_slice(&out).unwrap()
        };
        let l = line(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(l["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{l}");
        assert_eq!((l["request_id"].as_str(), l["record"].as_u64()), (Some("r1"), Some(7)), "{l}");
        let l = line(None);
        assert!(l.get("trace_id").is_none() && l["request_id"] == "r1", "{l}");
    }
}
