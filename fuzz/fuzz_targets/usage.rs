//! The token-usage reader (`usage::UsageParser`) on response bodies from an upstream: JSON and
//! event streams, OpenAI and Anthropic, delivered in any chunking.
//!
//! Input: one flags byte (bit 0: Anthropic, bit 1: `text/event-stream`, bits 2–4 all set:
//! content-encoded), two bytes choosing a cut, then the body.
//!
//! Invariants: never a panic; the result does not depend on where the body is cut (whole, cut
//! at one point, or a byte at a time give the same usage or the same error, and the same
//! `stream_done`); a body that never says `usage` has unknown usage; a content-encoded body is
//! never read; a known usage never undercounts (total ≥ input + output, all plausible).
#![no_main]
use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use uapk_gateway::config::UsageFormat;
use uapk_gateway::usage::{MAX_TOKENS, Usage, UsageParser};

fn run(format: UsageFormat, headers: &HeaderMap, chunks: &[&[u8]]) -> (bool, Result<Usage, String>) {
    let mut p = UsageParser::new(format, headers);
    for c in chunks {
        p.feed(c);
    }
    let done = p.stream_done();
    (done, p.finish())
}

fuzz_target!(|data: &[u8]| {
    let [flags, c0, c1, body @ ..] = data else { return };
    let format = if flags & 1 == 1 { UsageFormat::Anthropic } else { UsageFormat::OpenAi };
    let mut headers = HeaderMap::new();
    let sse = flags & 2 == 2;
    let content_type = if sse { "text/event-stream; charset=utf-8" } else { "application/json" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let encoded = flags & 0x1c == 0x1c;
    if encoded {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let cut = usize::from(u16::from_le_bytes([*c0, *c1])) % (body.len() + 1);

    let whole = run(format, &headers, &[body]);
    let (a, b) = body.split_at(cut);
    assert_eq!(run(format, &headers, &[a, b]), whole, "cut at byte {cut}");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(run(format, &headers, &bytes), whole, "fed a byte at a time");
    // Empty chunks (a transport's zero-length frames) change nothing.
    assert_eq!(run(format, &headers, &[&[], a, &[], b, &[]]), whole, "with empty chunks");

    let (done, result) = whole;
    if encoded {
        assert!(result.is_err(), "a content-encoded body was read: {result:?}");
        assert!(!done);
    }
    if !sse {
        assert!(!done, "a JSON body is not a stream");
    }
    if !body.windows(5).any(|w| w == b"usage") {
        assert!(result.is_err(), "usage read from a body that never names it: {result:?}");
    }
    if let Ok(u) = result {
        assert!(u.input_tokens <= MAX_TOKENS && u.output_tokens <= MAX_TOKENS && u.total_tokens <= MAX_TOKENS);
        assert!(u.total_tokens >= u.input_tokens + u.output_tokens, "total undercounts: {u:?}");
    }
});
