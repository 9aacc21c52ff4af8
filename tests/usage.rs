//! LLM usage (SPEC §14.5): connectors with `usage: openai | anthropic` record token usage from
//! JSON and streamed responses in outcome entries, and `max_tokens` budgets refuse once the
//! recorded total reaches the cap, also across a restart.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// What the fake LLM upstream answers to one request.
#[derive(Clone)]
struct Reply {
    content_type: &'static str,
    encoding: Option<&'static str>,
    chunks: Vec<String>,
    /// Wait for [`LlmUpstream::release`] before sending the last chunk.
    hold_last: bool,
}

/// What reached the upstream.
#[derive(Debug, Clone)]
struct SeenReq {
    path: String,
    headers: HashMap<String, String>,
    body: Value,
}

type Answer = Arc<dyn Fn(&SeenReq) -> Reply + Send + Sync>;

/// A loopback HTTP/1.1 upstream that answers with chunked bodies sent chunk by chunk (so
/// streaming through the gateway is observable), speaking OpenAI chat completions and Anthropic
/// messages by default.
struct LlmUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenReq>>>,
    answer: Arc<Mutex<Answer>>,
    release: Arc<Notify>,
}

fn sse(events: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    out.push("data: [DONE]\n\n".into());
    out
}

/// OpenAI and Anthropic answers, JSON or streamed per the request's `stream`, with usage.
fn default_answer(r: &SeenReq) -> Reply {
    let stream = r.body["stream"] == true;
    let openai = r.path.starts_with("/v1/chat/completions");
    match (openai, stream) {
        (true, false) => Reply {
            content_type: "application/json",
            encoding: None,
            chunks: vec![
                json!({"id": "chatcmpl-1", "object": "chat.completion", "model": r.body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60}})
                .to_string(),
            ],
            hold_last: false,
        },
        (true, true) => {
            let mut events = vec![
                json!({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}], "usage": null}),
                json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}], "usage": null}),
            ];
            if r.body["stream_options"]["include_usage"] == true {
                events.push(json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}}));
            }
            Reply { content_type: "text/event-stream; charset=utf-8", encoding: None, chunks: sse(&events), hold_last: false }
        }
        (false, false) => Reply {
            content_type: "application/json",
            encoding: None,
            chunks: vec![
                json!({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hi"}],
                    "stop_reason": "end_turn", "usage": {"input_tokens": 25, "output_tokens": 11}})
                .to_string(),
            ],
            hold_last: false,
        },
        (false, true) => {
            let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
            Reply {
                content_type: "text/event-stream",
                encoding: None,
                chunks: vec![
                    ev("message_start", json!({"type": "message_start", "message": {"id": "msg_2", "content": [], "usage": {"input_tokens": 31, "output_tokens": 1}}})),
                    ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}})),
                    ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": null}, "usage": {"output_tokens": 8}})),
                    ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}})),
                    ev("message_stop", json!({"type": "message_stop"})),
                ],
                hold_last: false,
            }
        }
    }
}

impl LlmUpstream {
    async fn start() -> LlmUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<SeenReq>>> = Arc::default();
        let answer: Arc<Mutex<Answer>> = Arc::new(Mutex::new(Arc::new(default_answer)));
        let release = Arc::new(Notify::new());
        let (s2, a2, r2) = (seen.clone(), answer.clone(), release.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                let (seen, answer, release) = (s2.clone(), a2.clone(), r2.clone());
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut stream).await else { return };
                    let reply = (answer.lock().unwrap().clone())(&req);
                    seen.lock().unwrap().push(req);
                    let mut head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n",
                        reply.content_type
                    );
                    if let Some(e) = reply.encoding {
                        head.push_str(&format!("content-encoding: {e}\r\n"));
                    }
                    head.push_str("\r\n");
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let n = reply.chunks.len();
                    for (i, c) in reply.chunks.iter().enumerate() {
                        if reply.hold_last && i + 1 == n {
                            release.notified().await;
                        }
                        let frame = format!("{:x}\r\n{c}\r\n", c.len());
                        if stream.write_all(frame.as_bytes()).await.is_err() || stream.flush().await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let _ = stream.write_all(b"0\r\n\r\n").await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        LlmUpstream { addr, seen, answer, release }
    }

    fn set_answer(&self, f: impl Fn(&SeenReq) -> Reply + Send + Sync + 'static) {
        *self.answer.lock().unwrap() = Arc::new(f);
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last(&self) -> SeenReq {
        self.seen.lock().unwrap().last().cloned().expect("the upstream saw no request")
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<SeenReq> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut tmp).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
    Some(SeenReq { path, headers, body })
}

/// A manifest with an OpenAI and an Anthropic connector on the fake upstream.
fn llm_manifest(agent: &str, up: SocketAddr, budgets: &str) -> String {
    let pem: String = issuer_pub_pem().lines().map(|l| format!("        {l}\n")).collect();
    format!(
        r#"apiVersion: uapk/v1
kind: Manifest
agent:
  id: {agent}
capability:
  required: true
  issuers:
    - id: platform
      public_key: |
{pem}connectors:
  - name: openai
    base_url: http://{up}
    usage: openai
    routes:
      - methods: [POST]
        path: /v1/chat/completions
        action: llm.chat
        params:
          model: {{ json: /model }}
  - name: anthropic
    base_url: http://{up}
    usage: anthropic
    routes:
      - methods: [POST]
        path: /v1/messages
        action: llm.messages
        params:
          model: {{ json: /model }}
policy:
  connectors: {{ allow: [openai, anthropic] }}
{budgets}"#
    )
}

/// POSTs `body` in base-URL mode; returns status, the `x-uapk-record` index and the body.
async fn call(gw: &TestGateway, agent: &str, path: &str, body: Value) -> (u16, Option<u64>, String) {
    let r = client()
        .post(gw.base(path))
        .header("x-uapk-capability", token(agent))
        .header("accept-encoding", "gzip, br")
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let record = r.headers().get("x-uapk-record").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    (status, record, r.text().await.unwrap())
}

/// The outcome entry of the decision at `record` (outcome entries follow the response).
async fn outcome_of(gw: &TestGateway, record: u64) -> Value {
    let want = record.to_string();
    for _ in 0..250 {
        if let Some(e) = gw.entries().into_iter().find(|e| e["kind"] == "outcome" && e["decision_idx"] == want.as_str())
        {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no outcome entry for record {record}");
}

fn usage(i: u64, o: u64, t: u64) -> Value {
    json!({"input_tokens": i.to_string(), "output_tokens": o.to_string(), "total_tokens": t.to_string()})
}

fn chat(stream: bool) -> Value {
    let mut b = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    if stream {
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

fn message(stream: bool) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn openai_and_anthropic_usage_is_recorded_in_outcome_entries_json_and_streamed() {
    let up = LlmUpstream::start().await;
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, ""))], "").await;

    let (status, record, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello there", "the body reaches the agent unchanged");
    let o = outcome_of(&gw, record.unwrap()).await;
    assert_eq!(o["usage"], usage(40, 20, 60), "{o}");
    assert_eq!(
        (o["agent"].as_str(), o["connector"].as_str(), o["action"].as_str()),
        (Some("llm-agent"), Some("openai"), Some("llm.chat"))
    );
    assert!(o.get("usage_error").is_none(), "{o}");
    // The upstream was asked for an uncompressed body, whatever the agent accepts.
    assert_eq!(up.last().headers.get("accept-encoding").map(String::as_str), Some("identity"));

    let (status, record, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(true)).await;
    assert_eq!(status, 200);
    assert_eq!(body, default_answer(&up.last()).chunks.concat(), "the stream reaches the agent unchanged");
    assert_eq!(outcome_of(&gw, record.unwrap()).await["usage"], usage(30, 12, 42));

    let (status, record, _) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(false)).await;
    assert_eq!(status, 200);
    assert_eq!(outcome_of(&gw, record.unwrap()).await["usage"], usage(25, 11, 36));

    let (status, record, body) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(true)).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("event: message_start\n") && body.contains("message_stop"), "{body}");
    let o = outcome_of(&gw, record.unwrap()).await;
    assert_eq!(o["usage"], usage(31, 15, 46), "input from message_start, output from the last message_delta: {o}");
    assert_eq!(o["status"], "200");
}

#[tokio::test]
async fn streams_pass_through_unbuffered_while_usage_is_read() {
    let up = LlmUpstream::start().await;
    up.set_answer(|r| Reply { hold_last: true, ..default_answer(r) });
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, ""))], "").await;
    let mut resp = client()
        .post(gw.base("/anthropic/v1/messages"))
        .header("x-uapk-capability", token("llm-agent"))
        .json(&message(true))
        .send()
        .await
        .unwrap();
    let record: u64 = resp.headers()["x-uapk-record"].to_str().unwrap().parse().unwrap();
    // The first events arrive while the upstream still holds the last one back.
    let mut got = String::new();
    while !got.contains("message_delta") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("events reach the agent before the response ends")
            .unwrap()
            .expect("more events");
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!got.contains("message_stop"));
    assert!(
        !gw.entries().iter().any(|e| e["kind"] == "outcome" && e["decision_idx"] == record.to_string().as_str()),
        "no outcome before the response ends"
    );
    up.release.notify_one();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(got, default_answer(&up.last()).chunks.concat());
    assert_eq!(outcome_of(&gw, record).await["usage"], usage(31, 15, 46));
}

#[tokio::test]
async fn missing_malformed_or_encoded_usage_is_recorded_as_unknown() {
    let up = LlmUpstream::start().await;
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, ""))], "").await;
    let cases: Vec<(Reply, &str)> = vec![
        // A stream without stream_options.include_usage.
        (
            Reply {
                content_type: "text/event-stream",
                encoding: None,
                chunks: sse(&[json!({"choices": [{"delta": {"content": "hi"}}]})]),
                hold_last: false,
            },
            "include_usage",
        ),
        (
            Reply {
                content_type: "application/json",
                encoding: None,
                chunks: vec![r#"{"usage": {"prompt_tokens": -4, "completion_tokens": 1}}"#.into()],
                hold_last: false,
            },
            "prompt_tokens",
        ),
        (
            Reply {
                content_type: "application/json",
                encoding: None,
                chunks: vec![r#"{"usage": {"prompt_tokens": 99999999999999999999999, "completion_tokens": 1}}"#.into()],
                hold_last: false,
            },
            "plausible",
        ),
        (
            Reply {
                content_type: "application/json",
                encoding: None,
                chunks: vec![r#"{"usage": {"prompt_tokens": 4, "#.into(), "oops".into()],
                hold_last: false,
            },
            "usage",
        ),
        (
            Reply {
                content_type: "application/json",
                encoding: Some("gzip"),
                chunks: vec!["\u{1f}garbage".into()],
                hold_last: false,
            },
            "content-encoded (gzip)",
        ),
    ];
    for (reply, why) in cases {
        let sent = reply.chunks.concat();
        up.set_answer(move |_| reply.clone());
        let (status, record, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(true)).await;
        assert_eq!(status, 200, "the response passes whatever its usage");
        assert_eq!(body, sent);
        let o = outcome_of(&gw, record.unwrap()).await;
        assert!(o["usage"].is_null(), "{o}");
        let err = o["usage_error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "{why}: {o}");
    }
    // Unknown usage counts nothing.
    let g = gw.gateway();
    let now = now();
    assert_eq!(
        g.budgets.used_tokens(
            "llm-agent",
            uapk_gateway::config::Window::Day,
            uapk_gateway::config::Scope::Agent,
            "llm-agent",
            now
        ),
        0
    );
}

#[tokio::test]
async fn a_token_budget_refuses_once_crossed_and_survives_a_restart() {
    let up = LlmUpstream::start().await;
    let budgets = "  budgets:\n    - window: day\n      scope: connector\n      max_tokens: 100\n";
    let files = [("a.yaml", llm_manifest("llm-agent", up.addr, budgets))];
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_in(dir, &files, "").await;

    // 60 tokens: under the cap. Another 60 (streamed): crosses it, and completes.
    let (s1, r1, _) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!(s1, 200);
    outcome_of(&gw, r1.unwrap()).await;
    let (s2, r2, body2) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(true)).await;
    assert_eq!(s2, 200);
    assert!(body2.contains("\"total_tokens\":42"), "the crossing request completes: {body2}");
    outcome_of(&gw, r2.unwrap()).await;
    assert_eq!(up.count(), 2);

    // The window's total (102) reached the cap: refused before reaching the upstream.
    let (s3, _, body3) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!(s3, 403, "{body3}");
    let v: Value = serde_json::from_str(&body3).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reasons"][0]["code"], "budget_exceeded");
    assert_eq!(v["error"]["code"], "budget_exceeded");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("deny: budget_exceeded: ") && msg.contains("102/100 tokens"), "{msg}");
    assert!(msg.ends_with(&format!("(record {})", v["record"])), "{msg}");
    assert_eq!(up.count(), 2, "nothing forwarded");
    // The budget is per connector: the Anthropic connector still has its own window.
    let (s4, r4, _) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(true)).await;
    assert_eq!(s4, 200);
    outcome_of(&gw, r4.unwrap()).await;

    // Restart on the same log: the token counts are rebuilt from the outcome entries.
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &files, "").await;
    let (s5, _, body5) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!(s5, 403, "{body5}");
    assert!(body5.contains("102/100 tokens"), "{body5}");
    let (s6, _, _) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(false)).await;
    assert_eq!(s6, 200, "46 anthropic tokens rebuilt, under its own cap");
    assert_eq!(up.count(), 4);
    let d = decisions(&gw.entries());
    assert_eq!(d.iter().filter(|e| e["reasons"][0]["code"] == "budget_exceeded").count(), 2);
}

#[tokio::test]
async fn a_client_that_stops_reading_at_the_final_event_still_gets_its_tokens_counted() {
    // openai-python closes a stream's response at `data: [DONE]` without reading on; the
    // upstream here also keeps the connection open after it.
    let up = LlmUpstream::start().await;
    up.set_answer(|r| {
        let mut reply = default_answer(r);
        if r.body["stream"] == true {
            reply.chunks.push(": trailing comment after the final event\n\n".into());
            reply.hold_last = true;
        }
        reply
    });
    let budgets = "  budgets:\n    - window: hour\n      max_tokens: 40\n";
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, budgets))], "").await;
    let mut resp = client()
        .post(gw.base("/openai/v1/chat/completions"))
        .header("x-uapk-capability", token("llm-agent"))
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    let record: u64 = resp.headers()["x-uapk-record"].to_str().unwrap().parse().unwrap();
    let mut got = String::new();
    while !got.contains("data: [DONE]\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await.unwrap().unwrap().unwrap();
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(resp);
    // The very next request sees the 42 tokens counted.
    let (status, _, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("42/40 tokens"), "{body}");
    let o = outcome_of(&gw, record).await;
    assert_eq!(o["usage"], usage(30, 12, 42));
    assert!(o.get("error").is_none(), "a stream read to its final event is complete: {o}");
    up.release.notify_one();
}
