//! Observability a platform team plugs into its own tools: OpenTelemetry spans received by a
//! minimal OTLP/HTTP collector in the test (the protobuf decoded), the caller's trace continued
//! and recorded as `trace_id`, a collector that never answers delaying no request and its lost
//! spans counted; the labels and process metrics of `/metrics`, and the Grafana dashboard in
//! docs/ querying only metrics the gateway exports.

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One span as the collector received it, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<any_value::Value> {
        self.span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()).and_then(|v| v.value)
    }
    fn str(&self, key: &str) -> String {
        match self.attr(key) {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("{key}: {other:?} in {:?}", self.span),
        }
    }
    fn int(&self, key: &str) -> i64 {
        match self.attr(key) {
            Some(any_value::Value::IntValue(i)) => i,
            other => panic!("{key}: {other:?} in {:?}", self.span),
        }
    }
    fn strings(&self, key: &str) -> Vec<String> {
        match self.attr(key) {
            Some(any_value::Value::ArrayValue(a)) => a
                .values
                .into_iter()
                .map(|v: AnyValue| match v.value {
                    Some(any_value::Value::StringValue(s)) => s,
                    other => panic!("{key}: {other:?}"),
                })
                .collect(),
            other => panic!("{key}: {other:?} in {:?}", self.span),
        }
    }
    fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }
    fn parent_id(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }
}

/// A minimal OTLP/HTTP collector: decodes every `POST /v1/traces` body as an
/// `ExportTraceServiceRequest` and keeps its spans.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let paths: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s2, p2) = (spans.clone(), paths.clone());
        serve(listener, move |req: http::Request<hyper::body::Incoming>| {
            let (spans, paths) = (s2.clone(), p2.clone());
            async move {
                paths.lock().unwrap().push(req.uri().path().to_string());
                let ctype = req.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
                assert_eq!(ctype.as_deref(), Some("application/x-protobuf"));
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
                for rs in export.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.clone())
                        .and_then(|v| v.value)
                        .map(|v| match v {
                            any_value::Value::StringValue(s) => s,
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            spans.lock().unwrap().push(Received { service: service.clone(), span });
                        }
                    }
                }
                let answer = ExportTraceServiceResponse::default().encode_to_vec();
                http::Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::from(answer)))
                    .unwrap()
            }
        });
        Collector { addr, spans, paths }
    }

    /// Waits (up to 15 s) until a span of this name carries `uapk.request_id` = `request_id`.
    async fn span(&self, name: &str, request_id: &str) -> Received {
        let id = Some(any_value::Value::StringValue(request_id.to_string()));
        eventually(format!("a {name} span for {request_id}"), Duration::from_secs(15), async || {
            let spans = self.spans.lock().unwrap();
            spans
                .iter()
                .find(|r| {
                    r.span.name == name
                        && r.span.attributes.iter().any(|kv| {
                            kv.key == "uapk.request_id" && kv.value.as_ref().and_then(|v| v.value.clone()) == id
                        })
                })
                .cloned()
        })
        .await
    }
}

/// A minimal OTLP/gRPC collector: HTTP/2, `TraceService/Export`, each message a 5-byte
/// length prefix and an `ExportTraceServiceRequest`, answered with `grpc-status: 0`.
async fn grpc_collector() -> (SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let s2 = spans.clone();
    serve(listener, move |req: http::Request<hyper::body::Incoming>| {
        let spans = s2.clone();
        async move {
            assert_eq!(req.uri().path(), "/opentelemetry.proto.collector.trace.v1.TraceService/Export");
            let body = req.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body[0], 0, "uncompressed");
            let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
            let export = ExportTraceServiceRequest::decode(&body[5..5 + len]).unwrap();
            for rs in export.resource_spans {
                for ss in rs.scope_spans {
                    spans.lock().unwrap().extend(ss.spans);
                }
            }
            let msg = ExportTraceServiceResponse::default().encode_to_vec();
            let mut framed = vec![0u8];
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> =
                vec![Ok(hyper::body::Frame::data(Bytes::from(framed))), Ok(hyper::body::Frame::trailers(trailers))];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            http::Response::builder().header("content-type", "application/grpc").body(body).unwrap()
        }
    });
    (addr, spans)
}

/// A collector that accepts connections and never reads or answers.
async fn silent_collector() -> (SocketAddr, Arc<Mutex<Vec<tokio::net::TcpStream>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::default();
    let h2 = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            h2.lock().unwrap().push(s);
        }
    });
    (addr, held)
}

fn otlp(endpoint: &str, extra: &str) -> String {
    format!("telemetry:\n  otlp:\n    endpoint: {endpoint}\n    protocol: http\n{extra}")
}

/// The value of the series `line_prefix` (name and labels exactly as exposed).
fn series(m: &str, line_prefix: &str) -> Option<f64> {
    m.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_decision_and_continue_the_callers_trace() {
    let collector = Collector::start().await;
    let up = Upstream::start().await;
    let gw = TestGateway::start(
        &[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))],
        &otlp(&format!("http://{}", collector.addr), "    timeout: 2s\n"),
    )
    .await;
    let tok = token("pay-agent");

    // An allowed request, inside the caller's trace.
    let r = client()
        .get(gw.base("/shop/v1/charges/ch_1"))
        .header("x-uapk-capability", &tok)
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let record: i64 = r.headers()["x-uapk-record"].to_str().unwrap().parse().unwrap();
    r.bytes().await.unwrap();
    let entry = decisions(&gw.entries()).pop().unwrap();
    assert_eq!(entry["trace_id"], TRACE, "the decision entry carries the caller's trace id: {entry}");
    let rid = entry["request_id"].as_str().unwrap().to_string();

    let server = collector.span("uapk.request", &rid).await;
    assert_eq!(server.trace_id(), TRACE);
    assert_eq!(server.parent_id(), PARENT, "the caller's span is the parent");
    assert_eq!(server.span.kind, 2, "SERVER");
    assert_eq!(server.service, "uapk-gateway");
    assert_eq!(server.str("uapk.decision"), "allow");
    assert_eq!(server.strings("uapk.reasons"), ["all_checks_passed"]);
    assert_eq!(server.str("uapk.agent"), "pay-agent");
    assert_eq!(server.str("uapk.connector"), "shop");
    assert_eq!(server.str("uapk.action"), "payment.read");
    assert_eq!(server.int("uapk.record"), record);
    assert_eq!(server.int("http.response.status_code"), 200);

    // The upstream call is a child span, and the upstream continues it.
    let upstream = collector.span("uapk.upstream", &rid).await;
    assert_eq!(upstream.trace_id(), TRACE);
    assert_eq!(upstream.parent_id(), server.span_id());
    assert_eq!(upstream.span.kind, 3, "CLIENT");
    assert_eq!(upstream.int("uapk.record"), record);
    assert_eq!(upstream.str("uapk.decision"), "allow");
    let seen = up.last().headers["traceparent"].to_str().unwrap().to_string();
    assert_eq!(seen, format!("00-{TRACE}-{}-01", upstream.span_id()), "the upstream sees the gateway's call span");
    assert!(up.last().headers.get("tracestate").is_none(), "no empty tracestate");
    assert!(collector.paths.lock().unwrap().iter().all(|p| p == "/v1/traces"));

    // A refusal: its span says why; no upstream span.
    let r = client()
        .get(gw.base("/shop/v1/nope"))
        .header("x-uapk-capability", &tok)
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    let entry = decisions(&gw.entries()).pop().unwrap();
    let rid = entry["request_id"].as_str().unwrap().to_string();
    assert_eq!(entry["trace_id"], TRACE);
    let denied = collector.span("uapk.request", &rid).await;
    assert_eq!(denied.str("uapk.decision"), "deny");
    assert_eq!(denied.strings("uapk.reasons"), ["route_not_allowed"]);
    assert_eq!(denied.int("uapk.record").to_string(), body["record"].to_string().trim_matches('"'));
    assert_eq!(denied.int("http.response.status_code"), 403);

    // Without a traceparent the gateway starts a trace, and records its id.
    let r = gw.get("/shop/v1/charges/ch_2", &tok).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let entry = decisions(&gw.entries()).pop().unwrap();
    let trace = entry["trace_id"].as_str().expect("a trace id when telemetry is on").to_string();
    assert!(trace.len() == 32 && trace != TRACE && trace.bytes().all(|b| b.is_ascii_hexdigit()), "{trace}");
    let fresh = collector.span("uapk.request", entry["request_id"].as_str().unwrap()).await;
    assert_eq!(fresh.trace_id(), trace);
    assert!(fresh.span.parent_span_id.is_empty(), "a root span");

    let m = gw.metrics().await;
    assert!(series(&m, "uapk_spans_exported_total").unwrap() >= 5.0, "{m}");
    assert_eq!(series(&m, "uapk_spans_dropped_total{reason=\"queue_full\"}"), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_grpc_too() {
    let (collector, spans) = grpc_collector().await;
    let up = Upstream::start().await;
    let gw = TestGateway::start(
        &[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))],
        &format!("telemetry:\n  otlp:\n    endpoint: http://{collector}\n    protocol: grpc\n"),
    )
    .await;
    let r = client()
        .get(gw.base("/shop/v1/charges/ch_1"))
        .header("x-uapk-capability", token("pay-agent"))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    eventually("the request's spans received over gRPC", Duration::from_secs(15), async || {
        let names: Vec<(String, String)> =
            spans.lock().unwrap().iter().map(|s| (s.name.clone(), hex::encode(&s.trace_id))).collect();
        let has = |name: &str| names.contains(&(name.into(), TRACE.into()));
        (has("uapk.request") && has("uapk.upstream")).then_some(())
    })
    .await;
    eventually("the gRPC export to be counted", Duration::from_secs(5), async || {
        (series(&gw.metrics().await, "uapk_spans_exported_total") >= Some(2.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_telemetry_a_callers_trace_id_is_recorded_and_passed_through() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let tok = token("pay-agent");
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let r = client()
        .get(gw.base("/shop/v1/charges/ch_1"))
        .header("x-uapk-capability", &tok)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(decisions(&gw.entries()).pop().unwrap()["trace_id"], TRACE);
    assert_eq!(up.last().headers["traceparent"], traceparent.as_str(), "passed through unchanged");

    // No traceparent (or an invalid one): no trace is known, and no trace_id is recorded.
    for header in [None, Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), Some("garbage")] {
        let mut req = client().get(gw.base("/shop/v1/charges/ch_1")).header("x-uapk-capability", &tok);
        if let Some(h) = header {
            req = req.header("traceparent", h);
        }
        assert_eq!(req.send().await.unwrap().status(), 200);
        let entry = decisions(&gw.entries()).pop().unwrap();
        assert!(entry.get("trace_id").is_none(), "{header:?}: {entry}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_delays_no_request_and_lost_spans_are_counted() {
    let (silent, held) = silent_collector().await;
    let up = Upstream::start().await;
    let gw = TestGateway::start(
        &[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))],
        &otlp(&format!("http://{silent}"), "    timeout: 3s\n    queue_size: 1\n"),
    )
    .await;
    let tok = token("pay-agent");
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let r = gw.get(&format!("/shop/v1/charges/ch_{i}"), &tok).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        slowest = slowest.max(t.elapsed());
    }
    // Every request is answered well within the collector's timeout: none waited for it.
    assert!(slowest < Duration::from_millis(1500), "a request took {slowest:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "20 requests took {:?}", started.elapsed());
    assert!(!held.lock().unwrap().is_empty(), "the gateway did try the collector");
    // One export in flight, one span queued: the rest were dropped, and counted.
    let m = gw.metrics().await;
    assert!(series(&m, "uapk_spans_dropped_total{reason=\"queue_full\"}").unwrap() >= 20.0, "{m}");
    // The export in flight times out and is counted too.
    let m = eventually("a failed export to be counted", Duration::from_secs(15), async || {
        let m = gw.metrics().await;
        (series(&m, "uapk_spans_dropped_total{reason=\"export_failed\"}").unwrap() >= 1.0).then_some(m)
    })
    .await;
    assert_eq!(series(&m, "uapk_spans_exported_total"), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_telemetry_settings_are_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, key) in [
        ("telemetry:\n  otlp:\n    endpoint: collector:4318\n", "telemetry.otlp.endpoint"),
        ("telemetry:\n  otlp:\n    endpoint: http://c:4318\n    protocol: thrift\n", "telemetry.otlp.protocol"),
        ("telemetry:\n  otlp:\n    endpoint: http://c:4317/v1/traces\n    protocol: grpc\n", "telemetry.otlp.endpoint"),
        ("telemetry:\n  otlp:\n    endpoint: http://c:4318\n    timeout: 0s\n", "telemetry.otlp.timeout"),
        ("telemetry:\n  otlp:\n    endpoint: http://c:4318\n    queue_size: 0\n", "telemetry.otlp.queue_size"),
        ("telemetry:\n  otlp:\n    endpoint: http://user:secret@c:4318\n", "telemetry.otlp.endpoint"),
        ("telemetry:\n  otlp:\n    endpont: http://c:4318\n", "endpont"),
    ] {
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, yaml).unwrap();
        let e = uapk_gateway::config::load_gateway(Some(&path)).err().unwrap_or_else(|| panic!("{yaml} accepted"));
        let text = e.to_string();
        assert!(text.contains(key), "{yaml}: {text}");
        assert!(!text.contains("secret"), "{text}");
    }
    // The defaults: off; an origin-only HTTP endpoint gets the OTLP traces path.
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, "log_format: json\n").unwrap();
    assert!(uapk_gateway::config::load_gateway(Some(&path)).unwrap().otlp.is_none());
    std::fs::write(&path, "telemetry:\n  otlp:\n    endpoint: http://collector:4318\n").unwrap();
    let o = uapk_gateway::config::load_gateway(Some(&path)).unwrap().otlp.unwrap();
    assert_eq!(o.endpoint, "http://collector:4318/v1/traces");
    assert_eq!((o.timeout, o.queue_size), (Duration::from_secs(2), 2048));
    std::fs::write(&path, "telemetry:\n  otlp:\n    endpoint: http://collector:4317\n    protocol: grpc\n").unwrap();
    let o = uapk_gateway::config::load_gateway(Some(&path)).unwrap().otlp.unwrap();
    assert_eq!(o.endpoint, "http://collector:4317");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_carry_reason_and_configured_agent_labels_only() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let tok = token("pay-agent");
    let get = |path: &str, tok: Option<String>| {
        let mut r = client().get(gw.base(path));
        if let Some(t) = tok {
            r = r.header("x-uapk-capability", t);
        }
        r.send()
    };
    assert_eq!(get("/shop/v1/charges/a", Some(tok.clone())).await.unwrap().status(), 200);
    assert_eq!(get("/shop/v1/charges/b", Some(tok.clone())).await.unwrap().status(), 200);
    assert_eq!(get("/shop/v1/nope", Some(tok.clone())).await.unwrap().status(), 403);
    // A token naming an agent no manifest configures: its id is not a label.
    assert_eq!(get("/shop/v1/charges/a", Some(token("ghost-agent-x1"))).await.unwrap().status(), 403);
    // No token, and a connector name of the caller's choosing: not a label either.
    assert_eq!(get("/made-up-connector-x2/a", None).await.unwrap().status(), 403);
    let m = gw.metrics().await;
    let line = |d: &str, r: &str, a: &str, c: &str| {
        format!(
            "uapk_requests_total{{decision=\"{d}\",reason=\"{r}\",agent=\"{a}\",connector=\"{c}\",mode=\"enforce\"}}"
        )
    };
    assert_eq!(series(&m, &line("allow", "all_checks_passed", "pay-agent", "shop")), Some(2.0), "{m}");
    assert_eq!(series(&m, &line("deny", "route_not_allowed", "pay-agent", "shop")), Some(1.0), "{m}");
    assert_eq!(series(&m, &line("deny", "manifest_not_found", "-", "shop")), Some(1.0), "{m}");
    assert_eq!(series(&m, &line("deny", "capability_token_required", "-", "unknown")), Some(1.0), "{m}");
    assert!(
        !m.contains("ghost-agent-x1") && !m.contains("made-up-connector-x2"),
        "a caller's string became a label: {m}"
    );

    // Process metrics, read from /proc/self.
    let rss = series(&m, "process_resident_memory_bytes").expect("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 1e11, "{rss}");
    let fds = series(&m, "process_open_fds").expect("process_open_fds");
    assert!(fds >= 3.0 && fds <= series(&m, "process_max_fds").unwrap(), "{fds}");
    assert!(series(&m, "process_cpu_seconds_total").expect("process_cpu_seconds_total") > 0.0);
}

/// Every metric the dashboard in docs/ queries is one `/metrics` exposes (a renamed metric
/// would leave an empty panel), and every label it groups `uapk_requests_total` by exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_exported_metrics() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], "").await;
    let r = client().get(gw.base("/shop/v1/charges/a")).header("x-uapk-capability", token("pay-agent")).send().await;
    assert_eq!(r.unwrap().status(), 200);
    let m = gw.metrics().await;
    let exposed: BTreeMap<String, Vec<String>> = m
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let name_end = l.find(['{', ' ']).unwrap();
            let labels = l[name_end..]
                .strip_prefix('{')
                .map(|rest| rest.split('}').next().unwrap())
                .map(|ls| ls.split(',').map(|kv| kv.split('=').next().unwrap().to_string()).collect())
                .unwrap_or_default();
            (l[..name_end].to_string(), labels)
        })
        .collect();

    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(e)) = o.get("expr") {
                    out.push(e.clone());
                }
                o.values().for_each(|v| collect(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");
    let mut names = Vec::new();
    for e in &exprs {
        let mut word = String::new();
        for c in e.chars().chain([' ']) {
            if c.is_ascii_alphanumeric() || c == '_' {
                word.push(c);
            } else {
                if word.starts_with("uapk_") || word.starts_with("process_") {
                    names.push(word.clone());
                }
                word.clear();
            }
        }
    }
    for want in [
        "uapk_requests_total",
        "uapk_request_duration_seconds_bucket",
        "uapk_upstream_duration_seconds_bucket",
        "uapk_audit_append_duration_seconds_bucket",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(names.iter().any(|n| n == want), "the dashboard charts no {want}");
    }
    for n in &names {
        assert!(exposed.contains_key(n), "the dashboard queries {n}, which /metrics does not expose");
    }
    for label in ["decision", "reason", "agent", "connector"] {
        assert!(exposed["uapk_requests_total"].iter().any(|l| l == label), "{label}");
        assert!(exprs.iter().any(|e| e.contains("uapk_requests_total") && e.contains(label)), "no panel by {label}");
    }
}
