//! A fake LLM API on 127.0.0.1:0 that bills like the real ones: OpenAI chat completions
//! (usage in a stream only with `stream_options.include_usage`, `n` choices billed), Anthropic
//! messages (prompt-cache writes and reads billed as input), JSON or streamed per the request's
//! `stream`. It records every request and every token it billed, whether or not it told the
//! client, and can hold its answers, stall, or hang up mid-response.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};

/// What the fake upstream answers to one request.
#[derive(Clone)]
pub(crate) struct Reply {
    pub content_type: &'static str,
    pub encoding: Option<&'static str>,
    pub chunks: Vec<String>,
    /// Wait for [`LlmUpstream::release`] before sending the last chunk.
    pub hold_last: bool,
    /// The tokens this answer bills (reported in it or not).
    pub billed: u64,
}

/// How the upstream delivers a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Every chunk, then the end of the body.
    Whole,
    /// The first `n` chunks, then silence with the connection open.
    StallAfter(usize),
    /// The first `n` chunks, then the connection is closed without ending the body.
    HangUpAfter(usize),
    /// The request is read (and billed), then the connection is closed without an answer.
    FailBeforeAnswer,
}

/// What reached the upstream.
#[derive(Debug, Clone)]
pub(crate) struct SeenReq {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// The body as received.
    pub raw: Vec<u8>,
}

type Answer = Arc<dyn Fn(&SeenReq) -> Reply + Send + Sync>;

pub(crate) struct LlmUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<SeenReq>>>,
    answer: Arc<Mutex<Answer>>,
    pub release: Arc<Notify>,
    delivery: Arc<Mutex<Delivery>>,
    /// Anthropic prompt-cache (creation, read) tokens every message reports and bills.
    cache: Arc<Mutex<(u64, u64)>>,
    /// Closed: answers wait (requests are still read and counted).
    gate: watch::Sender<bool>,
    billed: Arc<AtomicU64>,
}

pub(crate) fn sse(events: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    out.push("data: [DONE]\n\n".into());
    out
}

/// The `n` choices a request asks for (at least 1).
fn choices(r: &SeenReq) -> u64 {
    r.body["n"].as_u64().filter(|&n| n > 0).unwrap_or(1)
}

/// OpenAI and Anthropic answers, JSON or streamed per the request's `stream`, billed like the
/// real APIs (without prompt caching; see [`LlmUpstream::set_cache`]).
pub(crate) fn default_answer(r: &SeenReq) -> Reply {
    cached_answer(r, (0, 0))
}

fn cached_answer(r: &SeenReq, (creation, read): (u64, u64)) -> Reply {
    let stream = r.body["stream"] == true;
    let openai = r.path.starts_with("/v1/chat/completions");
    let n = choices(r);
    match (openai, stream) {
        (true, false) => {
            let (p, c) = (40, 20 * n);
            let choices: Vec<Value> = (0..n)
                .map(|i| json!({"index": i, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}))
                .collect();
            Reply {
                content_type: "application/json",
                encoding: None,
                chunks: vec![
                    json!({"id": "chatcmpl-1", "object": "chat.completion", "model": r.body["model"], "choices": choices,
                        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
                    .to_string(),
                ],
                hold_last: false,
                billed: p + c,
            }
        }
        (true, true) => {
            let (p, c) = (30, 12 * n);
            let mut events = Vec::new();
            for i in 0..n {
                events.push(json!({"id": "c1", "choices": [{"index": i, "delta": {"role": "assistant", "content": "Hel"}}], "usage": null}));
            }
            for i in 0..n {
                events.push(json!({"id": "c1", "choices": [{"index": i, "delta": {"content": "lo"}, "finish_reason": "stop"}], "usage": null}));
            }
            // Usage only for a client that asked for it (as the real API).
            if r.body["stream_options"]["include_usage"] == true {
                events.push(json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}));
            }
            Reply {
                content_type: "text/event-stream; charset=utf-8",
                encoding: None,
                chunks: sse(&events),
                hold_last: false,
                billed: p + c,
            }
        }
        (false, false) => {
            let mut usage = json!({"input_tokens": 25, "output_tokens": 11});
            if creation + read > 0 {
                usage["cache_creation_input_tokens"] = json!(creation);
                usage["cache_read_input_tokens"] = json!(read);
            }
            Reply {
                content_type: "application/json",
                encoding: None,
                chunks: vec![
                    json!({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hi"}],
                        "stop_reason": "end_turn", "usage": usage})
                    .to_string(),
                ],
                hold_last: false,
                billed: 25 + creation + read + 11,
            }
        }
        (false, true) => {
            let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
            let mut start = json!({"input_tokens": 31, "output_tokens": 1});
            if creation + read > 0 {
                start["cache_creation_input_tokens"] = json!(creation);
                start["cache_read_input_tokens"] = json!(read);
            }
            Reply {
                content_type: "text/event-stream",
                encoding: None,
                chunks: vec![
                    ev(
                        "message_start",
                        json!({"type": "message_start", "message": {"id": "msg_2", "content": [], "usage": start}}),
                    ),
                    ev(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
                    ),
                    ev(
                        "message_delta",
                        json!({"type": "message_delta", "delta": {"stop_reason": null}, "usage": {"output_tokens": 8}}),
                    ),
                    ev(
                        "message_delta",
                        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}}),
                    ),
                    ev("message_stop", json!({"type": "message_stop"})),
                ],
                hold_last: false,
                billed: 31 + creation + read + 15,
            }
        }
    }
}

impl LlmUpstream {
    pub(crate) async fn start() -> LlmUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<SeenReq>>> = Arc::default();
        let release = Arc::new(Notify::new());
        let delivery = Arc::new(Mutex::new(Delivery::Whole));
        let cache = Arc::new(Mutex::new((0, 0)));
        let (gate, gate_rx) = watch::channel(true);
        let billed = Arc::new(AtomicU64::new(0));
        let up = LlmUpstream {
            addr,
            seen: seen.clone(),
            answer: Arc::new(Mutex::new(Arc::new(default_answer))),
            release: release.clone(),
            delivery: delivery.clone(),
            cache: cache.clone(),
            gate,
            billed: billed.clone(),
        };
        let answer = up.answer.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                let (seen, answer, release, delivery, cache, mut gate, billed) = (
                    seen.clone(),
                    answer.clone(),
                    release.clone(),
                    delivery.clone(),
                    cache.clone(),
                    gate_rx.clone(),
                    billed.clone(),
                );
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut stream).await else { return };
                    let custom = answer.lock().unwrap().clone();
                    let cache = *cache.lock().unwrap();
                    let reply = if cache != (0, 0) { cached_answer(&req, cache) } else { custom(&req) };
                    let delivery = *delivery.lock().unwrap();
                    seen.lock().unwrap().push(req);
                    // The API bills a request it received, whatever it tells the client.
                    billed.fetch_add(reply.billed, Ordering::SeqCst);
                    let _ = gate.wait_for(|open| *open).await;
                    if delivery == Delivery::FailBeforeAnswer {
                        return;
                    }
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
                        match delivery {
                            Delivery::StallAfter(k) if i == k => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            Delivery::HangUpAfter(k) if i == k => return,
                            _ => {}
                        }
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
        up
    }

    pub(crate) fn set_answer(&self, f: impl Fn(&SeenReq) -> Reply + Send + Sync + 'static) {
        *self.answer.lock().unwrap() = Arc::new(f);
    }

    pub(crate) fn set_delivery(&self, d: Delivery) {
        *self.delivery.lock().unwrap() = d;
    }

    /// Anthropic messages report and bill these prompt-cache (creation, read) tokens.
    pub(crate) fn set_cache(&self, creation: u64, read: u64) {
        *self.cache.lock().unwrap() = (creation, read);
    }

    /// Holds every answer (`false`) until opened again (`true`); requests are still received.
    pub(crate) fn set_gate(&self, open: bool) {
        self.gate.send_replace(open);
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Every token the upstream billed so far.
    pub(crate) fn billed(&self) -> u64 {
        self.billed.load(Ordering::SeqCst)
    }

    pub(crate) fn last(&self) -> SeenReq {
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
    let raw = buf.split_off(head_end);
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Some(SeenReq { path, headers, body, raw })
}
