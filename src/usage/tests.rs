use super::*;

fn headers(content_type: &str, encoding: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
    if let Some(e) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_str(e).unwrap());
    }
    h
}

/// Parses `body` fed in chunks of `size` bytes.
fn parse_chunked(format: UsageFormat, content_type: &str, body: &[u8], size: usize) -> Result<Usage, String> {
    let mut p = UsageParser::new(format, &headers(content_type, None));
    for chunk in body.chunks(size.max(1)) {
        p.feed(chunk);
    }
    p.finish()
}

/// Parses `body` whole, then split at every byte boundary and byte by byte, and checks all
/// agree.
fn parse(format: UsageFormat, content_type: &str, body: &str) -> Result<Usage, String> {
    let b = body.as_bytes();
    let whole = parse_chunked(format, content_type, b, b.len());
    assert_eq!(parse_chunked(format, content_type, b, 1), whole, "byte by byte");
    for cut in 1..b.len() {
        let mut p = UsageParser::new(format, &headers(content_type, None));
        p.feed(&b[..cut]);
        p.feed(&b[cut..]);
        assert_eq!(p.finish(), whole, "split at {cut}");
    }
    whole
}

fn usage(i: u64, o: u64, t: u64) -> Result<Usage, String> {
    Ok(Usage {
        input_tokens: i,
        output_tokens: o,
        total_tokens: t,
        cache_creation_input_tokens: None,
        cache_read_input_tokens: None,
    })
}

const OPENAI_JSON: &str = r#"{
  "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "the \"usage\": {\"prompt_tokens\": 999} is text"}, "finish_reason": "stop"}],
  "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 0}}
}"#;

#[test]
fn openai_json() {
    assert_eq!(parse(UsageFormat::OpenAi, "application/json", OPENAI_JSON), usage(12, 5, 17));
}

#[test]
fn openai_json_without_total_adds_input_and_output() {
    let body = r#"{"usage":{"prompt_tokens":7,"completion_tokens":3},"choices":[]}"#;
    assert_eq!(parse(UsageFormat::OpenAi, "application/json; charset=utf-8", body), usage(7, 3, 10));
}

#[test]
fn a_total_below_input_plus_output_is_raised_to_the_sum() {
    let body = r#"{"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":1}}"#;
    assert_eq!(parse(UsageFormat::OpenAi, "application/json", body), usage(7, 3, 10));
}

#[test]
fn openai_embeddings_have_no_output() {
    let body = r#"{"object":"list","data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    assert_eq!(parse(UsageFormat::OpenAi, "application/json", body), usage(8, 0, 8));
}

const OPENAI_SSE: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":21,\"completion_tokens\":9,\"total_tokens\":30}}\n\n\
data: [DONE]\n\n";

#[test]
fn openai_sse_with_include_usage() {
    assert_eq!(parse(UsageFormat::OpenAi, "text/event-stream; charset=utf-8", OPENAI_SSE), usage(21, 9, 30));
}

#[test]
fn openai_sse_with_crlf_lines() {
    let body = OPENAI_SSE.replace('\n', "\r\n");
    assert_eq!(parse(UsageFormat::OpenAi, "text/event-stream", &body), usage(21, 9, 30));
}

#[test]
fn openai_sse_without_include_usage_is_unknown_and_says_why() {
    let body = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
    let e = parse(UsageFormat::OpenAi, "text/event-stream", body).unwrap_err();
    assert!(e.contains("include_usage"), "{e}");
}

#[test]
fn openai_responses_stream_reads_response_usage() {
    let body = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r1\",\"usage\":null}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\",\"usage\":{\"input_tokens\":4,\"output_tokens\":2,\"total_tokens\":6}}}\n\n";
    assert_eq!(parse(UsageFormat::OpenAi, "text/event-stream", body), usage(4, 2, 6));
}

const ANTHROPIC_JSON: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5",
"content":[{"type":"text","text":"Hello"}],"stop_reason":"end_turn",
"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":11}}"#;

#[test]
fn anthropic_json() {
    let want =
        Usage { cache_creation_input_tokens: Some(0), cache_read_input_tokens: Some(0), ..usage(25, 11, 36).unwrap() };
    assert_eq!(parse(UsageFormat::Anthropic, "application/json", ANTHROPIC_JSON), Ok(want));
}

const ANTHROPIC_SSE: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":31,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\ndata: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":null},\"usage\":{\"output_tokens\":8}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

#[test]
fn anthropic_sse_input_from_message_start_output_from_last_message_delta() {
    assert_eq!(parse(UsageFormat::Anthropic, "text/event-stream", ANTHROPIC_SSE), usage(31, 15, 46));
}

#[test]
fn anthropic_prompt_cache_writes_and_reads_are_input() {
    let body = r#"{"type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":50000,"cache_read_input_tokens":0,"output_tokens":100}}"#;
    let u = parse(UsageFormat::Anthropic, "application/json", body).unwrap();
    assert_eq!((u.input_tokens, u.output_tokens, u.total_tokens), (50010, 100, 50110));
    assert_eq!((u.cache_creation_input_tokens, u.cache_read_input_tokens), (Some(50000), Some(0)));
    let v = u.to_json();
    assert_eq!(v["cache_creation_input_tokens"], 50000);
    assert_eq!(v["total_tokens"], 50110);
    // Streamed: the cache counts come with message_start; a later message_delta that repeats
    // only input_tokens does not drop them.
    let sse = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\"cache_creation_input_tokens\":20,\"cache_read_input_tokens\":300,\"output_tokens\":1}}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":7,\"output_tokens\":40}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let u = parse(UsageFormat::Anthropic, "text/event-stream", sse).unwrap();
    assert_eq!((u.input_tokens, u.output_tokens, u.total_tokens), (327, 40, 367));
    // OpenAI's prompt_tokens already hold cached tokens: nothing is added.
    let u = parse(UsageFormat::OpenAi, "application/json", OPENAI_JSON).unwrap();
    assert_eq!(u.total_tokens, 17);
    assert!(u.to_json().get("cache_creation_input_tokens").is_none());
    // Cache counts that overflow are not plausible.
    let body =
        format!(r#"{{"usage":{{"input_tokens":1,"cache_read_input_tokens":{},"output_tokens":1}}}}"#, MAX_TOKENS);
    assert!(parse(UsageFormat::Anthropic, "application/json", &body).is_err());
}

#[test]
fn the_estimate_is_the_declared_output_limit_or_the_default_plus_a_quarter_of_the_body() {
    let est = |b: &str| estimate(b.as_bytes(), 4096);
    let body = r#"{"model":"m","messages":[]}"#; // 27 bytes: 7 tokens of input
    assert_eq!(est(body), 4096 + 7);
    let body = r#"{"model":"m","max_tokens":100}"#; // 30 bytes
    assert_eq!(est(body), 100 + 8);
    assert_eq!(est(r#"{"max_completion_tokens":50}"#), 50 + 7);
    assert_eq!(est(r#"{"max_output_tokens":64,"x":1}"#), 64 + 8);
    // n choices each up to the limit.
    assert_eq!(est(r#"{"max_tokens":100,"n":3}"#), 300 + 6);
    assert_eq!(est(r#"{"max_tokens":100,"n":1000000}"#), 100 * 128 + 8);
    // Not a positive integer: the connector's default.
    for b in [r#"{"max_tokens":0}"#, r#"{"max_tokens":"9"}"#, r#"{"max_tokens":-5}"#, "not json", ""] {
        assert_eq!(est(b), 4096 + (b.len() as u64).div_ceil(4), "{b}");
    }
    // Absurd limits saturate instead of wrapping.
    assert_eq!(estimate(br#"{"max_tokens":18446744073709551615,"n":128}"#, 1), MAX_TOKENS * 128 + 11);
}

#[test]
fn a_stream_without_a_final_blank_line_still_counts_its_last_event() {
    let body = "data: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}";
    assert_eq!(parse(UsageFormat::OpenAi, "text/event-stream", body), usage(2, 1, 3));
}

#[test]
fn data_split_over_several_lines_of_one_event() {
    let body = "data: {\"usage\":\ndata: {\"input_tokens\":3,\ndata: \"output_tokens\":4}}\n\n";
    assert_eq!(parse(UsageFormat::Anthropic, "text/event-stream", body), usage(3, 4, 7));
}

#[test]
fn malformed_usage_is_unknown_with_a_reason() {
    for (ct, body) in [
        ("application/json", r#"{"usage":{"prompt_tokens":1,"completion_tokens":"#),
        ("application/json", r#"{"usage": "lots"}"#),
        ("application/json", r#"{"usage": {"prompt_tokens": "12", "completion_tokens": 1}}"#),
        ("application/json", r#"{"usage": {"prompt_tokens": 1.5, "completion_tokens": 1}}"#),
        ("application/json", r#"{"usage": {"completion_tokens": 1}}"#),
        ("application/json", "not json at all"),
        ("application/json", ""),
        ("application/json", r#"{"error":{"message":"rate limited"}}"#),
        ("text/event-stream", "data: {\"usage\":{\"prompt_tokens\":1,,}}\n\n"),
        ("text/event-stream", "data: {\"usage\":{\"prompt_tokens\":1\n\n"),
        ("text/event-stream", ": keep-alive\n\nevent: x\n\n"),
    ] {
        let r = parse(UsageFormat::OpenAi, ct, body);
        assert!(r.is_err(), "{body:?} gave {r:?}");
        assert!(!r.unwrap_err().is_empty());
    }
}

#[test]
fn a_malformed_usage_is_not_hidden_by_a_later_valid_one() {
    let body =
        "data: {\"usage\":{\"input_tokens\":-1}}\n\ndata: {\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}\n\n";
    let e = parse(UsageFormat::Anthropic, "text/event-stream", body).unwrap_err();
    assert!(e.contains("input_tokens"), "{e}");
}

#[test]
fn absurd_numbers_are_unknown() {
    for n in ["-1", "18446744073709551616", "1e308", "9007199254740993", "99999999999999999999999999999"] {
        let body = format!(r#"{{"usage":{{"prompt_tokens":{n},"completion_tokens":1}}}}"#);
        let e = parse(UsageFormat::OpenAi, "application/json", &body).unwrap_err();
        assert!(e.contains("prompt_tokens"), "{n}: {e}");
    }
    // Each count plausible, their sum not.
    let big = MAX_TOKENS;
    let body = format!(r#"{{"usage":{{"input_tokens":{big},"output_tokens":{big}}}}}"#);
    assert!(parse(UsageFormat::Anthropic, "application/json", &body).is_err());
}

#[test]
fn content_encoded_responses_are_not_read() {
    let mut p = UsageParser::new(UsageFormat::OpenAi, &headers("application/json", Some("gzip")));
    p.feed(OPENAI_JSON.as_bytes());
    let e = p.finish().unwrap_err();
    assert!(e.contains("gzip"), "{e}");
    let mut p = UsageParser::new(UsageFormat::OpenAi, &headers("application/json", Some("identity")));
    p.feed(OPENAI_JSON.as_bytes());
    assert_eq!(p.finish(), usage(12, 5, 17));
}

#[test]
fn usage_connectors_ask_for_identity_encoding() {
    let mut c = crate::config::Connector {
        name: "llm".into(),
        base_url: None,
        hosts: vec![],
        ports: vec![],
        tls: crate::config::TlsMode::Intercept,
        credentials: Ok(vec![]),
        strip_headers: vec![],
        usage: None,
        usage_estimate: 4096,
        routes: vec![],
        mcp: None,
    };
    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip, br"));
    prepare_request(&mut h, &c);
    assert_eq!(h[header::ACCEPT_ENCODING], "gzip, br");
    c.usage = Some(UsageFormat::Anthropic);
    prepare_request(&mut h, &c);
    assert_eq!(h[header::ACCEPT_ENCODING], "identity");
}

#[test]
fn huge_bodies_stream_through_in_bounded_memory() {
    // 64 MiB of content before the usage, fed in 64 KiB chunks: the scanner keeps no copy.
    let mut p = UsageParser::new(UsageFormat::OpenAi, &headers("application/json", None));
    p.feed(br#"{"choices":[{"message":{"content":""#);
    let filler = vec![b'x'; 64 * 1024];
    for _ in 0..1024 {
        p.feed(&filler);
    }
    p.feed(br#""}}],"usage":{"prompt_tokens":1000,"completion_tokens":2000}}"#);
    assert_eq!(p.finish(), usage(1000, 2000, 3000));

    // A giant usage object is refused, not buffered.
    let mut p = UsageParser::new(UsageFormat::OpenAi, &headers("application/json", None));
    p.feed(br#"{"usage":{"pad":""#);
    for _ in 0..64 {
        p.feed(&filler);
    }
    p.feed(br#"","prompt_tokens":1,"completion_tokens":1}}"#);
    let e = p.finish().unwrap_err();
    assert!(e.contains("larger than"), "{e}");

    // A stream of many huge events keeps only the current event's small state.
    let mut p = UsageParser::new(UsageFormat::Anthropic, &headers("text/event-stream", None));
    p.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n");
    for _ in 0..256 {
        p.feed(b"data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"");
        p.feed(&filler);
        p.feed(b"\"}}\n\n");
        if let Mode::Sse(sse) = &p.mode {
            assert!(sse.scanner.keys.len() <= MAX_KEY_DEPTH && sse.field.len() <= 8);
            assert!(sse.scanner.capture.is_none());
        }
    }
    p.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":700}}\n\n");
    assert_eq!(p.finish(), usage(5, 700, 705));
}

#[test]
fn deep_nesting_and_garbage_never_panic() {
    let deep = format!("{}{}", "[{\"a\":".repeat(10_000), "}]".repeat(10_000));
    for body in [deep.as_str(), "}}}]]]\"\\", "{\"usage\"::::}", "\u{0}\u{1}{\"usage\":{\"input_tokens\":1"] {
        for ct in ["application/json", "text/event-stream"] {
            let mut p = UsageParser::new(UsageFormat::Anthropic, &headers(ct, None));
            p.feed(body.as_bytes());
            let _ = p.finish();
            let mut p = UsageParser::new(UsageFormat::Anthropic, &headers(ct, None));
            p.feed(format!("data: {body}\n\n").as_bytes());
            let _ = p.finish();
        }
    }
    // Usage deep inside something else is not the response's usage.
    let body = r#"{"choices":[{"usage":{"prompt_tokens":1,"completion_tokens":1}}],"meta":{"x":{"usage":{"prompt_tokens":1}}}}"#;
    assert!(parse(UsageFormat::OpenAi, "application/json", body).is_err());
}

#[test]
fn the_final_event_of_a_stream_is_spotted() {
    for (format, body, last) in [
        (UsageFormat::OpenAi, OPENAI_SSE, "data: [DONE]\n\n"),
        (UsageFormat::Anthropic, ANTHROPIC_SSE, "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
    ] {
        let (before, _) = body.split_at(body.len() - last.len());
        let mut p = UsageParser::new(format, &headers("text/event-stream", None));
        for b in before.as_bytes() {
            p.feed(std::slice::from_ref(b));
            assert!(!p.stream_done(), "done before the final event");
        }
        p.feed(last.as_bytes());
        assert!(p.stream_done());
    }
    // Data that merely mentions them, or a JSON body, is no final event.
    let mut p = UsageParser::new(UsageFormat::OpenAi, &headers("text/event-stream", None));
    p.feed(b"event: ping\ndata: {\"text\": \"[DONE] message_stop\"}\n\ndata: [DONE]x\n\n");
    assert!(!p.stream_done());
    let mut p = UsageParser::new(UsageFormat::OpenAi, &headers("application/json", None));
    p.feed(OPENAI_JSON.as_bytes());
    assert!(!p.stream_done());
}

proptest::proptest! {
    /// Any bytes, cut anywhere: never a panic, and the same answer as when fed whole.
    #[test]
    fn any_bytes_any_chunking_same_answer(
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        cuts in proptest::collection::vec(0usize..600, 0..8),
        sse in proptest::prelude::any::<bool>(),
        anthropic in proptest::prelude::any::<bool>(),
    ) {
        let format = if anthropic { UsageFormat::Anthropic } else { UsageFormat::OpenAi };
        let ct = if sse { "text/event-stream" } else { "application/json" };
        let whole = parse_chunked(format, ct, &body, body.len());
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
        cuts.sort_unstable();
        let mut p = UsageParser::new(format, &headers(ct, None));
        let mut at = 0;
        for c in cuts {
            p.feed(&body[at..c]);
            at = c;
        }
        p.feed(&body[at..]);
        proptest::prop_assert_eq!(p.finish(), whole);
    }

    /// Real-looking streams with arbitrary token counts read back exactly, however cut.
    #[test]
    fn streamed_counts_read_back(i in 0u64..1_000_000_000, o in 0u64..1_000_000_000, size in 1usize..64) {
        let body = format!(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"usage\":{{\"input_tokens\":{i},\"output_tokens\":1}}}}}}\n\n\
             event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":{o}}}}}\n\n"
        );
        let got = parse_chunked(UsageFormat::Anthropic, "text/event-stream", body.as_bytes(), size);
        proptest::prop_assert_eq!(got, usage(i, o, i + o));
    }
}
