//! LLM usage (SPEC §14.5): connectors with `usage: openai | anthropic` record token usage from
//! JSON and streamed responses in outcome entries, and `max_tokens` budgets refuse once the
//! recorded total reaches the cap, also across a restart.

use crate::support::llm::*;
use crate::support::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A manifest with an OpenAI and an Anthropic connector on the fake upstream.
fn llm_manifest(agent: &str, up: SocketAddr, budgets: &str) -> String {
    let head = manifest_head(agent, "  required: true\n");
    format!(
        r#"{head}connectors:
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

/// A POST of `body` as `agent` in base-URL mode.
fn request(gw: &TestGateway, agent: &str, path: &str, body: &Value) -> reqwest::RequestBuilder {
    client().post(gw.base(path)).header("x-uapk-capability", token(agent)).json(body)
}

/// POSTs `body` in base-URL mode; returns status, the `x-uapk-record` index and the body.
async fn call(gw: &TestGateway, agent: &str, path: &str, body: Value) -> (u16, Option<u64>, String) {
    let r = request(gw, agent, path, &body)
        .header("accept-encoding", "gzip, br")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let record = r.headers().contains_key("x-uapk-record").then(|| record_of(&r));
    (status, record, r.text().await.unwrap())
}

/// The estimate SPEC §16.1 reserves for a request the upstream received (the connectors here
/// keep the default `usage_estimate`, 4096).
fn estimate(r: &SeenReq) -> u64 {
    uapk_gateway::usage::estimate(&r.raw, 4096)
}

/// Tokens the gateway has counted for `agent` today.
fn tokens_counted(gw: &TestGateway, agent: &str) -> u64 {
    use uapk_gateway::config::{Scope, Window};
    gw.memory_budgets().used_tokens(agent, Window::Day, Scope::Agent, agent, now())
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
    let o = gw.outcome_of(record.unwrap()).await;
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
    assert_eq!(gw.outcome_of(record.unwrap()).await["usage"], usage(30, 12, 42));

    let (status, record, _) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(false)).await;
    assert_eq!(status, 200);
    assert_eq!(gw.outcome_of(record.unwrap()).await["usage"], usage(25, 11, 36));

    let (status, record, body) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(true)).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("event: message_start\n") && body.contains("message_stop"), "{body}");
    let o = gw.outcome_of(record.unwrap()).await;
    assert_eq!(o["usage"], usage(31, 15, 46), "input from message_start, output from the last message_delta: {o}");
    assert_eq!(o["status"], "200");
}

#[tokio::test]
async fn streams_pass_through_unbuffered_while_usage_is_read() {
    let up = LlmUpstream::start().await;
    up.set_answer(|r| Reply { hold_last: true, ..default_answer(r) });
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, ""))], "").await;
    let mut resp = request(&gw, "llm-agent", "/anthropic/v1/messages", &message(true)).send().await.unwrap();
    let record = record_of(&resp);
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
    assert_eq!(gw.outcome_of(record).await["usage"], usage(31, 15, 46));
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
                billed: 0,
            },
            "include_usage",
        ),
        (
            Reply {
                content_type: "application/json",
                encoding: None,
                chunks: vec![r#"{"usage": {"prompt_tokens": -4, "completion_tokens": 1}}"#.into()],
                hold_last: false,
                billed: 0,
            },
            "prompt_tokens",
        ),
        (
            Reply {
                content_type: "application/json",
                encoding: None,
                chunks: vec![r#"{"usage": {"prompt_tokens": 99999999999999999999999, "completion_tokens": 1}}"#.into()],
                hold_last: false,
                billed: 0,
            },
            "plausible",
        ),
        (
            Reply {
                content_type: "application/json",
                encoding: None,
                chunks: vec![r#"{"usage": {"prompt_tokens": 4, "#.into(), "oops".into()],
                hold_last: false,
                billed: 0,
            },
            "usage",
        ),
        (
            Reply {
                content_type: "application/json",
                encoding: Some("gzip"),
                chunks: vec!["\u{1f}garbage".into()],
                hold_last: false,
                billed: 0,
            },
            "content-encoded (gzip)",
        ),
    ];
    let mut charged = 0;
    for (reply, why) in cases {
        let sent = reply.chunks.concat();
        up.set_answer(move |_| reply.clone());
        let (status, record, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(true)).await;
        assert_eq!(status, 200, "the response passes whatever its usage");
        assert_eq!(body, sent);
        let o = gw.outcome_of(record.unwrap()).await;
        assert!(o["usage"].is_null(), "{o}");
        let err = o["usage_error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "{why}: {o}");
        // Unknown usage is charged the call's estimate (SPEC §16.1), never 0.
        assert_eq!(o["usage_charged"], estimate(&up.last()).to_string().as_str(), "{o}");
        charged += estimate(&up.last());
    }
    assert_eq!(tokens_counted(&gw, "llm-agent"), charged);
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
    gw.outcome_of(r1.unwrap()).await;
    let (s2, r2, body2) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(true)).await;
    assert_eq!(s2, 200);
    assert!(body2.contains("\"total_tokens\":42"), "the crossing request completes: {body2}");
    gw.outcome_of(r2.unwrap()).await;
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
    gw.outcome_of(r4.unwrap()).await;

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
    let mut resp = request(&gw, "llm-agent", "/openai/v1/chat/completions", &chat(true)).send().await.unwrap();
    let record = record_of(&resp);
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
    let o = gw.outcome_of(record).await;
    assert_eq!(o["usage"], usage(30, 12, 42));
    assert!(o.get("error").is_none(), "a stream read to its final event is complete: {o}");
    up.release.notify_one();
}

// ---------------------------------------------------------------- SPEC §16.1

const BUDGET_2000: &str = "  budgets:\n    - window: day\n      max_tokens: 2000\n";

/// The refusal's reason code, from a §7 body.
fn code(body: &str) -> String {
    reason(&serde_json::from_str(body).unwrap_or_default()).to_string()
}

/// Every outcome entry's `usage_charged`, summed.
fn charged_in_log(gw: &TestGateway) -> u64 {
    gw.entries()
        .iter()
        .filter(|e| e["kind"] == "outcome")
        .filter_map(|e| e["usage_charged"].as_str().and_then(|c| c.parse::<u64>().ok()))
        .sum()
}

/// A streamed chat completion without `stream_options.include_usage`.
fn stream_without_usage(max_tokens: Option<u64>) -> Value {
    let mut b = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    if let Some(m) = max_tokens {
        b["max_tokens"] = json!(m);
    }
    b
}

#[tokio::test]
async fn streams_without_usage_are_charged_their_estimate_and_the_budget_holds() {
    let up = LlmUpstream::start().await;
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, BUDGET_2000))], "").await;
    // Twenty streamed completions that never report usage: the first reserves 4096 + body/4,
    // more than the whole budget, and is charged that when its usage cannot be read.
    let mut statuses = Vec::new();
    let mut first = None;
    for _ in 0..20 {
        let (status, record, body) =
            call(&gw, "llm-agent", "/openai/v1/chat/completions", stream_without_usage(None)).await;
        if status == 200 {
            first.get_or_insert(record.unwrap());
            gw.outcome_of(record.unwrap()).await;
        } else {
            assert_eq!((status, code(&body).as_str()), (403, "budget_exceeded"), "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(up.count(), 1, "only the first call reached the upstream: {statuses:?}");
    let e = estimate(&up.last());
    assert!(e > 4096);
    let o = gw.outcome_of(first.unwrap()).await;
    assert!(o["usage"].is_null(), "{o}");
    assert!(o["usage_error"].as_str().unwrap().contains("include_usage"), "{o}");
    assert_eq!(o["usage_charged"], e.to_string().as_str());
    assert_eq!(tokens_counted(&gw, "llm-agent"), e);
    assert!(tokens_counted(&gw, "llm-agent") >= up.billed(), "never less than the upstream billed");
    let (_, _, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", stream_without_usage(None)).await;
    assert!(body.contains(&format!("{e}/2000 tokens")), "{body}");

    // Declaring an output limit makes the estimate small: calls pass until their charged
    // estimates reach the budget, one by one.
    let gw2 = TestGateway::start(&[("b.yaml", llm_manifest("llm-agent-b", up.addr, BUDGET_2000))], "").await;
    let before = up.count();
    let mut passed = 0;
    for _ in 0..40 {
        let (status, record, body) =
            call(&gw2, "llm-agent-b", "/openai/v1/chat/completions", stream_without_usage(Some(100))).await;
        match status {
            200 => {
                passed += 1;
                let o = gw2.outcome_of(record.unwrap()).await;
                assert_eq!(o["usage_charged"], estimate(&up.last()).to_string().as_str(), "{o}");
            }
            _ => assert_eq!(code(&body), "budget_exceeded", "{body}"),
        }
    }
    let e = estimate(&up.last());
    assert!(e < 200, "{e}");
    assert_eq!(passed, 2000_u64.div_ceil(e) as usize, "admitted while counted < 2000, each charged {e}");
    assert_eq!(up.count() - before, passed);
    assert_eq!(tokens_counted(&gw2, "llm-agent-b"), passed as u64 * e);
    assert_eq!(gw.memory_budgets().held() + gw2.memory_budgets().held(), 0, "every reservation settled");
}

/// Reads a streamed response until `until` shows up, then hangs up.
async fn read_until_then_hang_up(gw: &TestGateway, body: Value, until: &str) -> u64 {
    let mut resp = request(gw, "llm-agent", "/openai/v1/chat/completions", &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let record = record_of(&resp);
    let mut got = String::new();
    while !got.contains(until) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await.unwrap().unwrap().unwrap();
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!got.contains("[DONE]"), "hung up before the end: {got}");
    drop(resp);
    record
}

#[tokio::test]
async fn an_agent_that_hangs_up_after_the_finish_reason_still_has_its_usage_counted() {
    let up = LlmUpstream::start().await;
    // The usage chunk and [DONE] are held back until the agent has hung up.
    up.set_answer(|r| {
        let mut reply = default_answer(r);
        if r.body["stream"] == true {
            let tail: String = reply.chunks.split_off(reply.chunks.len() - 2).concat();
            reply.chunks.push(tail);
            reply.hold_last = true;
        }
        reply
    });
    let budgets = "  budgets:\n    - window: day\n      max_tokens: 100000\n";
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, budgets))], "").await;
    let record = read_until_then_hang_up(&gw, chat(true), "\"finish_reason\":\"stop\"").await;
    // Give the gateway a moment to see the agent go, then let the upstream finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    up.release.notify_one();
    let o = gw.outcome_of(record).await;
    assert_eq!(o["error"], "the client went away before the response ended", "{o}");
    assert_eq!(o["usage"], usage(30, 12, 42), "read on after the agent left: {o}");
    assert_eq!(o["usage_charged"], "42");
    assert_eq!(tokens_counted(&gw, "llm-agent"), 42);
    assert_eq!(gw.memory_budgets().held(), 0);
}

#[tokio::test]
async fn an_agent_that_hangs_up_on_a_stream_that_never_reports_usage_is_charged_the_estimate() {
    let up = LlmUpstream::start().await;
    // Two events (the second carries finish_reason), then silence: no usage, no [DONE].
    up.set_delivery(Delivery::StallAfter(2));
    let budgets = "  budgets:\n    - window: day\n      max_tokens: 100000\n";
    let gw = TestGateway::start(
        &[("a.yaml", llm_manifest("llm-agent", up.addr, budgets))],
        "limits:\n  usage_drain_timeout: 1s\n",
    )
    .await;
    let started = std::time::Instant::now();
    let record = read_until_then_hang_up(&gw, stream_without_usage(None), "\"finish_reason\":\"stop\"").await;
    let o = gw.outcome_of(record).await;
    assert!(started.elapsed() >= Duration::from_secs(1), "read on for limits.usage_drain_timeout");
    assert!(o["usage"].is_null(), "{o}");
    let err = o["usage_error"].as_str().unwrap();
    assert!(err.contains("usage_drain_timeout"), "{o}");
    assert_eq!(o["error"], "the client went away before the response ended");
    let e = estimate(&up.last());
    assert_eq!(o["usage_charged"], e.to_string().as_str());
    assert_eq!(tokens_counted(&gw, "llm-agent"), e);
    assert_eq!(gw.memory_budgets().held(), 0);
}

#[tokio::test]
async fn anthropic_prompt_cache_tokens_count_toward_the_budget() {
    let up = LlmUpstream::start().await;
    up.set_answer(|_| Reply {
        content_type: "application/json",
        encoding: None,
        chunks: vec![
            json!({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hi"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 10, "cache_creation_input_tokens": 50000, "cache_read_input_tokens": 0, "output_tokens": 100}})
            .to_string(),
        ],
        hold_last: false,
        billed: 50110,
    });
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, BUDGET_2000))], "").await;
    let (status, record, _) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(false)).await;
    assert_eq!(status, 200);
    let o = gw.outcome_of(record.unwrap()).await;
    assert_eq!(o["usage"]["total_tokens"], "50110", "{o}");
    assert_eq!(o["usage"]["input_tokens"], "50010");
    assert_eq!(o["usage"]["cache_creation_input_tokens"], "50000");
    assert_eq!(o["usage_charged"], "50110");
    assert_eq!(tokens_counted(&gw, "llm-agent"), 50110);
    for _ in 0..14 {
        let (status, _, body) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(false)).await;
        assert_eq!((status, code(&body).as_str()), (403, "budget_exceeded"), "{body}");
        assert!(body.contains("50110/2000 tokens"), "{body}");
    }
    assert_eq!(up.count(), 1);

    // Streamed: the cache counts come with message_start.
    up.set_cache(3000, 700);
    let budgets = "  budgets:\n    - window: day\n      max_tokens: 100000\n";
    let gw = TestGateway::start(&[("b.yaml", llm_manifest("llm-agent", up.addr, budgets))], "").await;
    let (status, record, _) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(true)).await;
    assert_eq!(status, 200);
    let o = gw.outcome_of(record.unwrap()).await;
    assert_eq!(o["usage"]["total_tokens"], (31 + 3000 + 700 + 15).to_string().as_str(), "{o}");
    assert_eq!(o["usage"]["cache_read_input_tokens"], "700");
    assert_eq!(tokens_counted(&gw, "llm-agent"), 31 + 3000 + 700 + 15);
}

#[tokio::test]
async fn concurrent_calls_overshoot_the_budget_by_at_most_one_estimate() {
    let up = LlmUpstream::start().await;
    // Answers wait until every call has been decided: none settles early.
    up.set_gate(false);
    let gw = Arc::new(TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, BUDGET_2000))], "").await);
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let (gw, body) = (gw.clone(), body.clone());
            tokio::spawn(async move { call(&gw, "llm-agent", "/openai/v1/chat/completions", body).await })
        })
        .collect();
    // Every refusal is answered at once; the admitted calls wait at the upstream.
    let mut waited = 0;
    while gw.entries().iter().filter(|e| e["kind"] == "decision").count() < 40 && waited < 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = estimate(&up.last());
    let allowed = 2000_u64.div_ceil(e) as usize;
    assert_eq!(up.count(), allowed, "admitted while counted + reserved < 2000, each reserving {e}");
    let reserved = {
        use uapk_gateway::config::{Scope, Window};
        gw.memory_budgets().reserved_tokens("llm-agent", Window::Day, Scope::Agent, "llm-agent", now())
    };
    assert_eq!(reserved, allowed as u64 * e);
    up.set_gate(true);
    let mut ok = 0;
    for c in calls {
        let (status, _, body) = c.await.unwrap();
        match status {
            200 => ok += 1,
            _ => assert_eq!((status, code(&body).as_str()), (403, "budget_exceeded"), "{body}"),
        }
    }
    assert_eq!(ok, allowed);
    assert_eq!(up.count(), allowed, "the upstream received at most what the rule allows");
    eventually("every reservation to settle", Duration::from_secs(5), async || {
        (gw.memory_budgets().held() == 0).then_some(())
    })
    .await;
    // Each settled to the usage its response reported (40 + 20).
    assert_eq!(tokens_counted(&gw, "llm-agent"), allowed as u64 * 60);
    assert_eq!(up.billed(), allowed as u64 * 60);
}

#[tokio::test]
async fn rebuilt_token_counters_equal_the_runtime_ones() {
    use uapk_gateway::config::{Scope, Window};
    let up = LlmUpstream::start().await;
    let budgets = "  budgets:\n    - window: day\n      scope: connector\n      max_tokens: 1000000\n";
    let files = [("a.yaml", llm_manifest("llm-agent", up.addr, budgets))];
    let gw = TestGateway::start_in(tempfile::tempdir().unwrap(), &files, "").await;
    let mut records = Vec::new();
    for (path, body) in [
        ("/openai/v1/chat/completions", chat(false)), // usage read: 60
        ("/openai/v1/chat/completions", stream_without_usage(None)), // estimate charged
        ("/openai/v1/chat/completions", json!({"model": "m", "n": 3, "messages": []})), // n = 3: 40 + 60
        ("/anthropic/v1/messages", message(true)),    // 46
    ] {
        let (status, record, _) = call(&gw, "llm-agent", path, body).await;
        assert_eq!(status, 200);
        records.push(record.unwrap());
    }
    up.set_delivery(Delivery::FailBeforeAnswer);
    let (status, record, _) = call(&gw, "llm-agent", "/anthropic/v1/messages", message(false)).await;
    assert_eq!(status, 502);
    records.push(record.unwrap());
    let mut charged = Vec::new();
    for r in &records {
        charged.push(gw.outcome_of(*r).await["usage_charged"].as_str().unwrap().parse::<u64>().unwrap());
    }
    assert_eq!(charged[0], 60);
    assert_eq!(charged[2], 40 + 3 * 20, "n > 1: every choice counts");
    assert_eq!(charged[3], 46);
    assert!(charged[1] > 4096 && charged[4] > 64, "{charged:?}");
    let counters = |gw: &TestGateway| {
        let b = gw.memory_budgets();
        let t = now();
        (
            b.used_tokens("llm-agent", Window::Day, Scope::Agent, "llm-agent", t),
            b.used_tokens("llm-agent", Window::Hour, Scope::Connector, "openai", t),
            b.used_tokens("llm-agent", Window::Day, Scope::Connector, "anthropic", t),
            b.used_tokens("llm-agent", Window::Day, Scope::Action, "llm.messages", t),
        )
    };
    let runtime = counters(&gw);
    assert_eq!(runtime.0, charged.iter().sum::<u64>());
    assert_eq!(runtime.0, charged_in_log(&gw));
    assert_eq!(runtime.1, charged[0] + charged[1] + charged[2]);
    let dir = gw.stop().await;
    let gw = TestGateway::start_in(dir, &files, "").await;
    assert_eq!(counters(&gw), runtime, "the rebuild counts usage_charged exactly as at runtime");
}

#[tokio::test]
async fn an_upstream_error_after_the_request_was_sent_is_charged_the_estimate() {
    let up = LlmUpstream::start().await;
    let budgets = "  budgets:\n    - window: day\n      max_tokens: 100000\n";
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, budgets))], "").await;
    // The upstream reads (and bills) the request, then closes without answering.
    up.set_delivery(Delivery::FailBeforeAnswer);
    let (status, record, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!((status, code(&body).as_str()), (502, "upstream_unavailable"), "{body}");
    let o = gw.outcome_of(record.unwrap()).await;
    assert!(o["usage"].is_null(), "{o}");
    assert_eq!(o["usage_error"], "no response body was read");
    let e1 = estimate(&up.last());
    assert_eq!(o["usage_charged"], e1.to_string().as_str());

    // It hangs up mid-stream (after message_start): the stream's counts so far are partial, so
    // its usage is unknown and it is charged the estimate.
    up.set_delivery(Delivery::HangUpAfter(1));
    let r = request(&gw, "llm-agent", "/anthropic/v1/messages", &message(true)).send().await.unwrap();
    let record = record_of(&r);
    assert!(r.text().await.is_err(), "the agent sees the stream break");
    let o = gw.outcome_of(record).await;
    assert_eq!(o["error"], "the upstream failed mid-response");
    assert!(o["usage"].is_null(), "{o}");
    assert!(o["usage_error"].as_str().unwrap().contains("before its final event"), "{o}");
    let e2 = estimate(&up.last());
    assert_eq!(o["usage_charged"], e2.to_string().as_str());
    assert_eq!(tokens_counted(&gw, "llm-agent"), e1 + e2);

    // Nothing reached an upstream that cannot be connected to: nothing is charged.
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw2 = TestGateway::start(&[("b.yaml", llm_manifest("llm-agent", closed, budgets))], "").await;
    let (status, record, _) = call(&gw2, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!(status, 502);
    let o = gw2.outcome_of(record.unwrap()).await;
    assert_eq!(
        (o["usage_charged"].as_str(), o["usage_error"].as_str()),
        (Some("0"), Some("the request did not reach the upstream"))
    );
    assert_eq!(tokens_counted(&gw2, "llm-agent"), 0);
    assert_eq!(gw.memory_budgets().held() + gw2.memory_budgets().held(), 0);
}

#[tokio::test]
async fn a_call_refused_after_its_reservation_holds_nothing() {
    use uapk_gateway::config::{Scope, Window};
    let up = LlmUpstream::start().await;
    let policy =
        "  budgets:\n    - window: day\n      max_tokens: 10000\n  rate_limits:\n    - rate: 1/h\n      burst: 1\n";
    let gw = TestGateway::start(&[("a.yaml", llm_manifest("llm-agent", up.addr, policy))], "").await;
    let (status, record, _) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!(status, 200);
    gw.outcome_of(record.unwrap()).await;
    // Refused by the rate limit after the budget admitted it: the reservation goes back.
    for _ in 0..3 {
        let (status, _, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
        assert_eq!((status, code(&body).as_str()), (429, "rate_limited"), "{body}");
    }
    let b = gw.memory_budgets();
    assert_eq!(b.held(), 0);
    assert_eq!(b.reserved_tokens("llm-agent", Window::Day, Scope::Agent, "llm-agent", now()), 0);
    assert_eq!(b.used("llm-agent", Window::Day, Scope::Agent, "llm-agent", now()), 1, "one action forwarded");
    assert_eq!(tokens_counted(&gw, "llm-agent"), 60);
    assert_eq!(up.count(), 1);

    // Escalated after reserving (the call needs approval): answered with its approval id, and
    // nothing stays held while it waits.
    let policy = "  budgets:\n    - window: day\n      max_tokens: 10000\n  approval:\n    action_types: [llm.chat]\n";
    let gw = TestGateway::start(&[("b.yaml", llm_manifest("llm-agent", up.addr, policy))], "").await;
    let (status, _, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!((status, code(&body).as_str()), (403, "requires_human_approval"), "{body}");
    let b = gw.memory_budgets();
    assert_eq!((b.held(), b.reserved_tokens("llm-agent", Window::Day, Scope::Agent, "llm-agent", now())), (0, 0));
    assert_eq!(b.used("llm-agent", Window::Day, Scope::Agent, "llm-agent", now()), 0);

    // Refused by the SSRF guard after reserving (a private address nobody allowed).
    let private: SocketAddr = "10.255.255.1:9".parse().unwrap();
    let policy = "  budgets:\n    - window: day\n      max_tokens: 10000\n";
    let gw = TestGateway::start(&[("c.yaml", llm_manifest("llm-agent", private, policy))], "").await;
    let (status, _, body) = call(&gw, "llm-agent", "/openai/v1/chat/completions", chat(false)).await;
    assert_eq!((status, code(&body).as_str()), (403, "ssrf_blocked"), "{body}");
    let b = gw.memory_budgets();
    assert_eq!((b.held(), b.reserved_tokens("llm-agent", Window::Day, Scope::Agent, "llm-agent", now())), (0, 0));
    assert_eq!(b.used("llm-agent", Window::Day, Scope::Agent, "llm-agent", now()), 0);
    assert_eq!(up.count(), 1);
}
