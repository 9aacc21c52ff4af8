//! OpenTelemetry traces (`telemetry.otlp`, SPEC §17): a server span per request and a client
//! span per upstream call, exported over OTLP (HTTP/protobuf or gRPC) to the operator's
//! collector.
//!
//! The incoming W3C `traceparent` is continued (a new trace otherwise), and its trace id is
//! what the access line and the `decision` entry carry as `trace_id` — also with telemetry off,
//! when a caller sent a valid `traceparent`.
//!
//! A collector never delays a request: a finished span is handed to a bounded queue without
//! waiting (full → dropped, counted in `uapk_spans_dropped_total{reason="queue_full"}`); one
//! task on the gateway's runtime sends batches, each bounded by `telemetry.otlp.timeout` (a
//! failed or late batch is dropped, counted as `export_failed`). The SDK's own batch processor
//! is not used because it neither runs on our runtime (our hyper/rustls client needs it) nor
//! reports what it drops.

use crate::config::{OtlpProtocol, OtlpSettings};
use crate::metrics::SpanStats;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the exporter waits after a span for more to fill a batch.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Largest batch sent in one export.
const MAX_BATCH: usize = 512;
/// Largest collector answer read (it is discarded; OTLP answers are tiny).
const MAX_ANSWER: usize = 64 * 1024;

/// The gateway's tracer, or nothing when `telemetry.otlp` is off.
pub(crate) struct Telemetry {
    tracer: Option<SdkTracer>,
    /// Kept so the span pipeline lives as long as the gateway.
    _provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Telemetry off: only a caller's `traceparent` gives a request a trace id.
    pub(crate) fn off() -> Telemetry {
        Telemetry { tracer: None, _provider: None }
    }

    /// Starts the export pipeline. Must run inside the gateway's tokio runtime. `extra_roots`
    /// are PEM files trusted for an `https://` collector next to the webpki roots.
    pub(crate) fn start(
        settings: &OtlpSettings,
        extra_roots: &[PathBuf],
        stats: Arc<SpanStats>,
    ) -> Result<Telemetry, String> {
        let mut exporter = exporter(settings, extra_roots)?;
        let mut resource = Resource::builder();
        // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the builder; the service
        // name defaults to the gateway's.
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("uapk-gateway");
        }
        let resource = resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(settings.queue_size);
        tokio::spawn(export_loop(exporter, rx, settings.queue_size.min(MAX_BATCH), settings.timeout, stats.clone()));
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(BoundedQueue { tx, stats })
            .build();
        let tracer = provider.tracer("uapk-gateway");
        Ok(Telemetry { tracer: Some(tracer), _provider: Some(provider) })
    }

    /// The trace of a request with these headers: its server span (telemetry on) continuing a
    /// valid `traceparent`, or just that `traceparent`'s trace id (telemetry off).
    pub(crate) fn start_request(&self, headers: &HeaderMap, method: &str) -> RequestTrace {
        let parent = if headers.contains_key("traceparent") {
            opentelemetry::propagation::TextMapPropagator::extract(
                &TraceContextPropagator::new(),
                &HeaderExtractor(headers),
            )
        } else {
            Context::new()
        };
        let Some(tracer) = &self.tracer else {
            let sc = parent.span().span_context().clone();
            return RequestTrace { trace_id: sc.is_valid().then(|| sc.trace_id().to_string()), cx: None, tracer: None };
        };
        let span = tracer
            .span_builder("uapk.request")
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("http.request.method", method.to_string())])
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        let trace_id = Some(cx.span().span_context().trace_id().to_string());
        RequestTrace { trace_id, cx: Some(cx), tracer: Some(tracer.clone()) }
    }
}

/// One request's trace: its id (when known) and, with telemetry on, its server span. Clones
/// share the span; it ends at the first `finish` (or when the last clone is dropped).
#[derive(Clone, Default)]
pub(crate) struct RequestTrace {
    trace_id: Option<String>,
    cx: Option<Context>,
    tracer: Option<SdkTracer>,
}

/// What a request's span records when it ends.
pub(crate) struct SpanFacts<'a> {
    pub request_id: &'a str,
    pub agent: &'a str,
    pub connector: &'a str,
    pub action: &'a str,
    pub decision: &'a str,
    /// Comma-separated reason codes.
    pub reasons: &'a str,
    pub record: Option<u64>,
    pub status: u16,
    pub error: Option<&'a str>,
}

impl SpanFacts<'_> {
    fn attributes(&self) -> Vec<KeyValue> {
        let mut a = vec![
            KeyValue::new("uapk.request_id", self.request_id.to_string()),
            KeyValue::new("uapk.agent", self.agent.to_string()),
            KeyValue::new("uapk.connector", self.connector.to_string()),
            KeyValue::new("uapk.action", self.action.to_string()),
            KeyValue::new("uapk.decision", self.decision.to_string()),
            KeyValue::new(
                "uapk.reasons",
                opentelemetry::Value::Array(
                    self.reasons
                        .split(',')
                        .filter(|r| !r.is_empty())
                        .map(|r| opentelemetry::StringValue::from(r.to_string()))
                        .collect::<Vec<_>>()
                        .into(),
                ),
            ),
            KeyValue::new("http.response.status_code", i64::from(self.status)),
        ];
        if let Some(r) = self.record {
            a.push(KeyValue::new("uapk.record", i64::try_from(r).unwrap_or(i64::MAX)));
        }
        if let Some(e) = self.error {
            a.push(KeyValue::new("error.type", e.to_string()));
        }
        a
    }
}

fn end_span(cx: &Context, facts: &SpanFacts<'_>) {
    let span = cx.span();
    span.set_attributes(facts.attributes());
    if facts.status >= 500 || facts.error.is_some() {
        span.set_status(Status::error(facts.error.unwrap_or("").to_string()));
    }
    span.end();
}

impl RequestTrace {
    /// The trace id (32 hex digits) when a trace is known.
    pub(crate) fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }

    /// Ends the request's span with what was decided (no-op without telemetry, or when it has
    /// already ended).
    pub(crate) fn finish(&self, facts: &SpanFacts<'_>) {
        if let Some(cx) = &self.cx {
            end_span(cx, facts);
        }
    }

    /// Starts the span of the upstream call and, with telemetry on, sets the forwarded
    /// `traceparent` (and `tracestate`) to it, so the upstream continues the gateway's trace.
    /// Without telemetry the caller's headers pass through untouched.
    pub(crate) fn start_upstream(&self, headers: &mut HeaderMap) -> UpstreamSpan {
        let (Some(cx), Some(tracer)) = (&self.cx, &self.tracer) else {
            return UpstreamSpan(None);
        };
        let span = tracer.span_builder("uapk.upstream").with_kind(SpanKind::Client).start_with_context(tracer, cx);
        let child = cx.with_span(span);
        opentelemetry::propagation::TextMapPropagator::inject_context(
            &TraceContextPropagator::new(),
            &child,
            &mut HeaderInjector(headers),
        );
        // The propagator writes `tracestate` even when it is empty.
        if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
            headers.remove("tracestate");
        }
        UpstreamSpan(Some(child))
    }
}

/// The span of one upstream call; ended by `finish` (or when dropped).
pub(crate) struct UpstreamSpan(Option<Context>);

impl UpstreamSpan {
    pub(crate) fn finish(self, facts: &SpanFacts<'_>) {
        if let Some(cx) = &self.0 {
            end_span(cx, facts);
        }
    }
}

/// Hands finished spans to the export task without ever waiting.
#[derive(Debug)]
struct BoundedQueue {
    tx: mpsc::Sender<SpanData>,
    stats: Arc<SpanStats>,
}

impl SpanProcessor for BoundedQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(span) {
            self.stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Sends batches one at a time, each bounded by `timeout`; what fails is counted and dropped
/// (a slow collector makes the queue fill, never a request wait).
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    max_batch: usize,
    timeout: Duration,
    stats: Arc<SpanStats>,
) {
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let result = match tokio::time::timeout(timeout, exporter.export(batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the collector did not answer within telemetry.otlp.timeout".to_string()),
        };
        match result {
            Ok(()) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                if failing {
                    tracing::info!("span export recovered");
                }
                failing = false;
            }
            Err(e) => {
                stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                // Once per failure spell, not per batch (see uapk_spans_dropped_total).
                if !failing {
                    tracing::warn!(error = %e, spans = n, "span export failed; spans are dropped until it recovers");
                }
                failing = true;
            }
        }
    }
}

fn exporter(settings: &OtlpSettings, extra_roots: &[PathBuf]) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let built = match settings.protocol {
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(CollectorClient::new(extra_roots, settings.timeout)?)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.timeout)
            .build(),
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout);
            if settings.endpoint.starts_with("https://") {
                use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
                let mut tls = ClientTlsConfig::new().with_webpki_roots();
                for path in extra_roots {
                    let pem =
                        std::fs::read(path).map_err(|e| format!("extra upstream root {}: {e}", path.display()))?;
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                b = b.with_tls_config(tls);
            }
            b.build()
        }
    };
    built.map_err(|e| format!("telemetry.otlp: {e}"))
}

/// OTLP/HTTP through the gateway's own hyper and rustls (ring), not a second HTTP/TLS stack.
/// The collector is the operator's: it is dialled directly (no SSRF guard), trusted by the
/// webpki roots plus `tls.extra_upstream_roots`.
#[derive(Debug)]
struct CollectorClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    timeout: Duration,
}

impl CollectorClient {
    fn new(extra_roots: &[PathBuf], timeout: Duration) -> Result<CollectorClient, String> {
        let roots = crate::proxy::upstream::root_store(extra_roots)?;
        let tls = crate::proxy::upstream::tls_config(roots).map_err(|e| format!("telemetry.otlp: {e}"))?;
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let https = crate::proxy::upstream::https_over(http, tls);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(CollectorClient { client, timeout })
    }
}

#[async_trait::async_trait]
impl HttpClient for CollectorClient {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> Result<http::Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, Full::new(body));
        let exchange = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, HttpError>(http::Response::from_parts(parts, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err("the collector did not answer within telemetry.otlp.timeout".into()),
        }
    }
}
