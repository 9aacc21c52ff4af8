//! `uapk-gateway demo-upstream`: a small local HTTP API standing in for the upstreams of the
//! example manifests, so the README walkthrough runs offline. It answers in the shape of the
//! real APIs (Stripe refunds, charges and customers, form-encoded; helpdesk tickets, JSON; chat
//! completions with a `usage` object, also streamed as server-sent events; Anthropic-style
//! messages, also streamed as the Messages API's events) and echoes what it received under `demo_echo`, with credential headers shown as
//! `[redacted]`, so a reader sees what the gateway forwarded and that the agent never held the
//! key. It stores nothing and is for demos and tests only.

use bytes::Bytes;
use futures_util::stream;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Headers whose values the echo never shows.
const REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "set-cookie",
    "x-uapk-capability",
    "x-uapk-override",
];

/// Bodies larger than this are refused (413): the demo has no use for them.
const MAX_BODY: usize = 1 << 20;

type Body = BoxBody<Bytes, Infallible>;

/// Serves the demo API on `listen` until the process ends.
pub(crate) async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    println!(
        "demo upstream listening on http://{addr} (Stripe-, helpdesk- and chat-completions-shaped; for demos only)"
    );
    let counter = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("demo-upstream: accept: {e}");
                continue;
            }
        };
        let counter = counter.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let counter = counter.clone();
                async move { Ok::<_, Infallible>(handle(req, &counter).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// What the demo received, as it echoes it back.
struct Received {
    method: Method,
    path: String,
    query: Option<String>,
    headers: BTreeMap<String, String>,
    body: Bytes,
}

impl Received {
    fn echo(&self) -> Value {
        let path = match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        };
        let body = String::from_utf8_lossy(&self.body).into_owned();
        json!({ "method": self.method.as_str(), "path": path, "headers": self.headers, "body": body })
    }

    fn form(&self) -> BTreeMap<String, String> {
        url::form_urlencoded::parse(&self.body).into_owned().collect()
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }
}

/// The echoed headers: lower-case names, credentials redacted, repeated headers joined.
pub(crate) fn redacted_headers(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let name = name.as_str().to_ascii_lowercase();
        let shown = if REDACTED.contains(&name.as_str()) {
            "[redacted]".to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        out.entry(name).and_modify(|v| *v = format!("{v}, {shown}")).or_insert(shown);
    }
    out
}

async fn handle(req: Request<Incoming>, counter: &AtomicU64) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return json_response(StatusCode::PAYLOAD_TOO_LARGE, json!({"error": "body too large"})),
    };
    let got = Received {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: redacted_headers(&parts.headers),
        body,
    };
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    let (status, resp) = route(&got, n);
    eprintln!("demo-upstream: {} {} -> {}", got.method, got.path, status.as_u16());
    resp.unwrap_or_else(|v| json_response(status, v))
}

/// Answers one request: `Err(json)` for an ordinary JSON answer with `status`, `Ok(response)` for
/// a streamed one.
fn route(got: &Received, n: u64) -> (StatusCode, Result<Response<Body>, Value>) {
    let segs: Vec<&str> = got.path.trim_start_matches('/').split('/').collect();
    let echo = got.echo();
    let with_echo = |mut v: Value| {
        if let Some(o) = v.as_object_mut() {
            o.insert("demo_echo".into(), echo.clone());
        }
        v
    };
    let ok = |v: Value| (StatusCode::OK, Err(with_echo(v)));
    match (&got.method, segs.as_slice()) {
        // ---- Stripe-shaped, form-encoded
        (&Method::POST, ["v1", "refunds"]) => {
            let f = got.form();
            let amount = f.get("amount").map(|a| a.parse::<i64>().map(Value::from).unwrap_or(json!(a)));
            let metadata: Map<String, Value> = f
                .iter()
                .filter_map(|(k, v)| {
                    let inner = k.strip_prefix("metadata[")?.strip_suffix(']')?;
                    Some((inner.to_string(), json!(v)))
                })
                .collect();
            ok(json!({
                "id": format!("re_demo_{n}"), "object": "refund", "amount": amount,
                "currency": f.get("currency"), "customer": f.get("customer"),
                "metadata": metadata, "status": "succeeded",
            }))
        }
        (&Method::GET, ["v1", "charges", id]) => ok(json!({
            "id": id, "object": "charge", "amount": 1500, "currency": "usd", "status": "succeeded",
        })),
        (&Method::GET, ["v1", "charges"]) => ok(json!({"object": "list", "data": [], "has_more": false})),
        (&Method::GET, ["v1", "customers", id]) => ok(json!({"id": id, "object": "customer"})),
        // ---- helpdesk-shaped (Zendesk-style), JSON
        (&Method::GET, ["api", "v2", "tickets"]) => ok(json!({"tickets": [], "count": 0})),
        (&Method::GET, ["api", "v2", "tickets", id]) => {
            ok(json!({"ticket": {"id": id, "status": "open", "subject": "Demo ticket"}}))
        }
        (&Method::GET, ["api", "v2", "search"]) => {
            ok(json!({"results": [], "count": 0, "query": got.query_param("query")}))
        }
        (&Method::POST, ["api", "v2", "tickets"]) => {
            let ticket = got.json().and_then(|v| v.get("ticket").cloned()).unwrap_or(Value::Null);
            let mut t = ticket.as_object().cloned().unwrap_or_default();
            t.insert("id".into(), json!(n));
            t.insert("status".into(), json!("new"));
            (StatusCode::CREATED, Err(with_echo(json!({"ticket": t}))))
        }
        (&Method::PUT, ["api", "v2", "tickets", id]) => {
            let ticket = got.json().and_then(|v| v.get("ticket").cloned()).unwrap_or(Value::Null);
            let mut t = ticket.as_object().cloned().unwrap_or_default();
            t.insert("id".into(), json!(id));
            ok(json!({"ticket": t}))
        }
        (&Method::DELETE, ["api", "v2", "tickets", _]) => (StatusCode::NO_CONTENT, Err(Value::Null)),
        // ---- LLM-shaped, JSON
        (&Method::GET, ["v1", "models"]) => ok(json!({
            "object": "list",
            "data": [{"id": "gpt-4o-mini", "object": "model"}, {"id": "gpt-4o", "object": "model"}],
        })),
        (&Method::POST, ["v1", "chat", "completions"]) => chat_completion(got, n, &echo),
        (&Method::POST, ["v1", "messages"]) => message(got, n, &echo),
        _ => (
            StatusCode::NOT_FOUND,
            Err(with_echo(
                json!({"error": {"type": "not_found", "message": "the demo upstream has no such endpoint"}}),
            )),
        ),
    }
}

/// The prompt text of a chat request (every message's string content) and the demo's reply.
fn conversation(req: &Value) -> (String, String) {
    let mut prompt = Vec::new();
    for m in req.get("messages").and_then(Value::as_array).into_iter().flatten() {
        match m.get("content") {
            Some(Value::String(s)) => prompt.push(s.clone()),
            Some(Value::Array(parts)) => {
                prompt.extend(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(str::to_string))
            }
            _ => {}
        }
    }
    let prompt = prompt.join("\n");
    let last = prompt.lines().last().unwrap_or("").to_string();
    (prompt, format!("This is the demo upstream. You said: {last}"))
}

/// A deterministic stand-in for a token count: whitespace-separated words.
fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

fn chat_completion(got: &Received, n: u64, echo: &Value) -> (StatusCode, Result<Response<Body>, Value>) {
    let req = got.json().unwrap_or(Value::Null);
    let model = req.get("model").cloned().unwrap_or(Value::Null);
    let (prompt, reply) = conversation(&req);
    let (p, c) = (words(&prompt), words(&reply));
    let usage = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
    let id = format!("chatcmpl-demo-{n}");
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        return (
            StatusCode::OK,
            Err(json!({
                "id": id, "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": usage, "demo_echo": echo,
            })),
        );
    }
    // Streamed: one chunk per word, a finishing chunk, a chunk with the usage, then [DONE].
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    let parts: Vec<&str> = reply.split_inclusive(' ').collect();
    events.extend(parts.iter().map(|w| chunk(json!({"content": w}), Value::Null)));
    events.push(chunk(json!({}), json!("stop")));
    events.push(json!({"id": id, "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}));
    let mut frames: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    frames.push("data: [DONE]\n\n".into());
    (StatusCode::OK, Ok(event_stream(frames)))
}

/// An Anthropic-style message; with `stream: true`, the Messages API's event stream:
/// `message_start` (input tokens), a text block in word-sized deltas, `message_delta` (output
/// tokens, stop reason), `message_stop`.
fn message(got: &Received, n: u64, echo: &Value) -> (StatusCode, Result<Response<Body>, Value>) {
    let req = got.json().unwrap_or(Value::Null);
    let model = req.get("model").cloned().unwrap_or(Value::Null);
    let (prompt, reply) = conversation(&req);
    let (input, output) = (words(&prompt), words(&reply));
    let id = format!("msg_demo_{n}");
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        return (
            StatusCode::OK,
            Err(json!({
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": reply}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": output},
                "demo_echo": echo,
            })),
        );
    }
    let mut events = vec![
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1},
        }}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
    ];
    events.extend(
        reply
            .split_inclusive(' ')
            .map(|w| json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})),
    );
    events.push(json!({"type": "content_block_stop", "index": 0}));
    events.push(json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                       "usage": {"output_tokens": output}}));
    events.push(json!({"type": "message_stop"}));
    let frames =
        events.iter().map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("message"))).collect();
    (StatusCode::OK, Ok(event_stream(frames)))
}

/// A `text/event-stream` response sending each event as its own frame.
fn event_stream(events: Vec<String>) -> Response<Body> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        events.into_iter().map(|e| Ok(Frame::data(Bytes::from(e)))).collect();
    let body = StreamBody::new(stream::iter(frames)).boxed();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn json_response(status: StatusCode, v: Value) -> Response<Body> {
    let body = if v.is_null() { Bytes::new() } else { Bytes::from(format!("{v}\n")) };
    let mut resp = Response::new(Full::new(body).boxed());
    *resp.status_mut() = status;
    if !v.is_null() {
        resp.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(method: Method, path: &str, query: Option<&str>, headers: &[(&str, &str)], body: &str) -> Received {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        Received {
            method,
            path: path.into(),
            query: query.map(str::to_string),
            headers: redacted_headers(&h),
            body: Bytes::from(body.to_string()),
        }
    }

    fn json_of(r: (StatusCode, Result<Response<Body>, Value>)) -> (StatusCode, Value) {
        match r {
            (s, Err(v)) => (s, v),
            (_, Ok(_)) => panic!("streamed"),
        }
    }

    #[test]
    fn credentials_are_redacted_in_the_echo_and_other_headers_shown() {
        let got = received(
            Method::POST,
            "/v1/refunds",
            None,
            &[
                ("Authorization", "Bearer sk_test_secret"),
                ("x-api-key", "k-secret"),
                ("cookie", "s=secret"),
                ("stripe-account", "acct_1"),
            ],
            "amount=1500&currency=usd&customer=cus_123&metadata%5Border_id%5D=o-7",
        );
        let (status, v) = json_of(route(&got, 1));
        assert_eq!(status, StatusCode::OK);
        let text = v.to_string();
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(v["demo_echo"]["headers"]["authorization"], "[redacted]");
        assert_eq!(v["demo_echo"]["headers"]["x-api-key"], "[redacted]");
        assert_eq!(v["demo_echo"]["headers"]["cookie"], "[redacted]");
        assert_eq!(v["demo_echo"]["headers"]["stripe-account"], "acct_1");
        assert_eq!(v["object"], "refund");
        assert_eq!(v["amount"], 1500);
        assert_eq!(v["customer"], "cus_123");
        assert_eq!(v["metadata"]["order_id"], "o-7");
    }

    #[test]
    fn chat_completion_reports_usage() {
        let got = received(
            Method::POST,
            "/v1/chat/completions",
            None,
            &[("content-type", "application/json")],
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}"#,
        );
        let (_, v) = json_of(route(&got, 3));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        let c = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), 2 + c);
    }

    #[tokio::test]
    async fn streamed_chat_completion_ends_with_usage_then_done() {
        let got = received(
            Method::POST,
            "/v1/chat/completions",
            None,
            &[],
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let (_, resp) = route(&got, 1);
        let resp = resp.expect("streamed");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(*events.last().unwrap(), "data: [DONE]");
        let usage: Value = serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], 1);
        assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 1);
        assert!(events.len() > 4, "{events:?}");
    }

    #[tokio::test]
    async fn streamed_message_is_the_anthropic_event_sequence_with_usage() {
        let got = received(
            Method::POST,
            "/v1/messages",
            None,
            &[],
            r#"{"model":"claude-sonnet-4-5","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"hello there"}]}"#,
        );
        let resp = route(&got, 1).1.expect("streamed");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let events: Vec<(String, Value)> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(name.strip_prefix("event: ").unwrap(), v["type"], "{e}");
                (v["type"].as_str().unwrap().to_string(), v)
            })
            .collect();
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
        assert_eq!(names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 2);
        let text: String = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, v)| v["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "This is the demo upstream. You said: hello there");
        assert_eq!(events[events.len() - 2].1["usage"]["output_tokens"], 9);
        // Without `stream`, one JSON message with the same usage.
        let got = received(Method::POST, "/v1/messages", None, &[], r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        let (_, v) = json_of(route(&got, 2));
        assert_eq!(v["type"], "message");
        assert_eq!(v["usage"]["input_tokens"], 1);
    }

    #[test]
    fn unknown_endpoints_are_404_with_the_echo() {
        let got = received(Method::GET, "/nope", Some("a=1"), &[], "");
        let (status, v) = json_of(route(&got, 1));
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v["demo_echo"]["path"], "/nope?a=1");
    }
}
