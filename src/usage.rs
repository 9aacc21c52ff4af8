//! LLM token usage read from responses as they stream past (SPEC §14.5).
//!
//! A connector with `usage: openai | anthropic` gets a [`UsageParser`] per response. It is fed
//! every chunk the agent receives, unchanged and unbuffered, and keeps only a few small buffers:
//! a scanner state per JSON document (the body, or one server-sent event's `data`), the stack
//! of enclosing object keys (bounded depth and key length), and the bytes of a `usage` object
//! being captured (bounded). Memory does not grow with the response.
//!
//! What is read:
//! - a JSON body: its top-level `usage` (OpenAI chat completions and responses, Anthropic
//!   messages);
//! - an event stream (`text/event-stream`): every event's `usage`, `message.usage` (Anthropic
//!   `message_start`) and `response.usage` (OpenAI responses `response.completed`). The last
//!   event carrying usage wins, field by field, so on Anthropic streams input comes from
//!   `message_start` and output from the last `message_delta`, and on OpenAI streams (with
//!   `stream_options.include_usage`) from the last chunk before `[DONE]`.
//!
//! OpenAI `prompt_tokens` / `completion_tokens` are input / output (`prompt_tokens` already
//! holds cached tokens, and with `n > 1` the counts cover every choice). Anthropic reports
//! prompt-cache writes and reads apart from `input_tokens`: input is `input_tokens +
//! cache_creation_input_tokens + cache_read_input_tokens` (SPEC §16.1), and the two parts are
//! kept in the record too. `total_tokens` is the upstream's total, or input + output when it
//! gives none (or gives less). Anything else —
//! no usage, a malformed one, counts that are not plausible non-negative integers, a
//! content-encoded body — is usage unknown, with the reason: never a guess, never a panic.
//! Usage connectors ask the upstream for an identity-encoded body (`prepare_request`), so a
//! compressed answer only comes from an upstream that ignores `Accept-Encoding`.

use crate::config::{Connector, UsageFormat};
use http::{HeaderMap, HeaderValue, header};
use serde_json::Value;

/// Largest `usage` object captured (real ones are a few hundred bytes).
const MAX_CAPTURE: usize = 16 * 1024;
/// Object keys are remembered to this depth (the paths read are at most two deep).
const MAX_KEY_DEPTH: usize = 8;
/// Longest key remembered (longer keys are never one of the paths read).
const MAX_KEY_LEN: usize = 32;
/// Largest plausible token count of one response (2^53: also exact in every JSON parser).
pub const MAX_TOKENS: u64 = 1 << 53;

/// Token usage of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Every input token, prompt-cache writes and reads included.
    pub input_tokens: u64,
    /// Output tokens: OpenAI `completion_tokens` (responses API: `output_tokens`), Anthropic
    /// `output_tokens`.
    pub output_tokens: u64,
    /// The upstream's total, or input + output when it gives none or less.
    pub total_tokens: u64,
    /// Anthropic's prompt-cache writes (`cache_creation_input_tokens`, part of `input_tokens`),
    /// when reported.
    pub cache_creation_input_tokens: Option<u64>,
    /// Anthropic's prompt-cache reads (`cache_read_input_tokens`, part of `input_tokens`), when
    /// reported.
    pub cache_read_input_tokens: Option<u64>,
}

impl Usage {
    /// The `usage` object of an outcome entry.
    pub(crate) fn to_json(self) -> Value {
        let mut v = serde_json::json!({
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        });
        if let Some(n) = self.cache_creation_input_tokens {
            v["cache_creation_input_tokens"] = n.into();
        }
        if let Some(n) = self.cache_read_input_tokens {
            v["cache_read_input_tokens"] = n.into();
        }
        v
    }
}

/// Largest `n` (choices) an estimate multiplies the declared output limit by.
const MAX_CHOICES: u64 = 128;

/// The tokens an LLM call reserves before it is forwarded (SPEC §16.1): the output limit the
/// request declares (`max_tokens`, `max_completion_tokens` or `max_output_tokens` at the top of a
/// JSON body, times `n` choices when `n > 1`), else `default_output` (the connector's
/// `usage_estimate`), plus the body's length / 4, rounded up, for the input. A declared limit
/// that is not a positive integer is ignored (the upstream refuses it anyway).
pub fn estimate(body: &[u8], default_output: u64) -> u64 {
    let input = (body.len() as u64).div_ceil(4);
    let declared = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let limit = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .filter_map(|k| v.get(*k).and_then(Value::as_u64))
            .filter(|&n| n > 0)
            .max()?;
        let n = v.get("n").and_then(Value::as_u64).filter(|&n| n > 1).map_or(1, |n| n.min(MAX_CHOICES));
        Some(limit.min(MAX_TOKENS).saturating_mul(n))
    });
    declared.unwrap_or(default_output).saturating_add(input)
}

/// Makes the upstream answer a usage connector's requests uncompressed, so usage can be read
/// as the body streams past (the agent gets the same bytes; only the transfer is larger).
pub(crate) fn prepare_request(headers: &mut HeaderMap, connector: &Connector) {
    if connector.usage.is_some() {
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
}

/// Where a captured `usage` object was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Top-level `usage`.
    Top,
    /// `message.usage` (Anthropic `message_start`).
    Message,
    /// `response.usage` (OpenAI responses stream).
    Response,
}

fn path_of(keys: &[Option<Vec<u8>>], key: &[u8]) -> Option<At> {
    if key != b"usage" {
        return None;
    }
    match keys {
        [] => Some(At::Top),
        [Some(k)] if k == b"message" => Some(At::Message),
        [Some(k)] if k == b"response" => Some(At::Response),
        _ => None,
    }
}

/// The `usage` values one document held: where, and their bytes or why they were not kept.
type Captures = Vec<(At, Result<Vec<u8>, String>)>;

/// An incremental scanner over one JSON document that captures the raw bytes of the values at
/// the paths [`path_of`] names. It tolerates any input (garbage is simply not captured).
#[derive(Debug, Default)]
struct Scanner {
    /// Nesting depth (objects and arrays).
    depth: usize,
    /// For each enclosing container below the top: the key it is the value of (`None` for an
    /// array element or a key not remembered). `keys.len() == depth - 1` while `depth <=
    /// MAX_KEY_DEPTH`.
    keys: Vec<Option<Vec<u8>>>,
    /// Whether each open container is an object (bounded like `keys`).
    is_object: Vec<bool>,
    in_string: bool,
    escape: bool,
    /// Collecting a string that may be a key (in an object, where a key is expected).
    expect_key: bool,
    string_is_key: bool,
    key: Vec<u8>,
    key_too_long: bool,
    /// The last complete key of the innermost object, until its value is over.
    last_key: Option<Vec<u8>>,
    /// The path whose value is being captured and the depth it started at.
    capture: Option<(At, usize, Vec<u8>)>,
    /// Whether the current capture overflowed.
    overflow: bool,
    /// Finished captures.
    found: Captures,
}

impl Scanner {
    fn in_object(&self) -> bool {
        self.depth > 0 && self.is_object.get(self.depth - 1).copied().unwrap_or(false)
    }

    fn end_capture(&mut self) {
        if let Some((at, _, bytes)) = self.capture.take() {
            let r = if self.overflow {
                Err(format!("the usage object is larger than {MAX_CAPTURE} bytes"))
            } else {
                Ok(bytes)
            };
            self.overflow = false;
            self.found.push((at, r));
        }
    }

    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some((_, start, buf)) = &mut self.capture {
            // A value ends at a `,` or `}` of the object holding it (outside strings).
            let ends = !self.in_string && self.depth == *start && (b == b',' || b == b'}');
            if !ends {
                if buf.len() < MAX_CAPTURE {
                    buf.push(b);
                } else {
                    self.overflow = true;
                }
            }
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
                self.key_byte(b);
            } else if b == b'\\' {
                self.escape = true;
                self.key_byte(b);
            } else if b == b'"' {
                self.in_string = false;
                if self.string_is_key {
                    self.string_is_key = false;
                    self.last_key = (!self.key_too_long).then(|| std::mem::take(&mut self.key));
                    self.key.clear();
                }
            } else {
                self.key_byte(b);
            }
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.string_is_key = self.expect_key && self.in_object();
                self.key.clear();
                self.key_too_long = false;
            }
            b':' if self.in_object() => {
                self.expect_key = false;
                if self.capture.is_none()
                    && self.depth <= MAX_KEY_DEPTH
                    && let Some(k) = &self.last_key
                    && let Some(at) = path_of(&self.keys, k)
                {
                    self.capture = Some((at, self.depth, Vec::new()));
                    self.overflow = false;
                }
            }
            b',' => {
                if self.capture.as_ref().is_some_and(|c| c.1 == self.depth) {
                    self.end_capture();
                }
                self.expect_key = self.in_object();
                if self.in_object() {
                    self.last_key = None;
                }
            }
            b'{' | b'[' => {
                if self.depth > 0 && self.depth <= MAX_KEY_DEPTH {
                    let k = if self.in_object() { self.last_key.take() } else { None };
                    self.keys.push(k);
                }
                self.depth += 1;
                if self.depth <= MAX_KEY_DEPTH {
                    self.is_object.push(b == b'{');
                }
                self.expect_key = b == b'{';
                self.last_key = None;
            }
            b'}' | b']' => {
                if self.capture.as_ref().is_some_and(|c| c.1 == self.depth) {
                    self.end_capture();
                }
                if self.depth == 0 {
                    return;
                }
                if self.depth <= MAX_KEY_DEPTH {
                    self.is_object.pop();
                }
                self.depth -= 1;
                if self.depth > 0 && self.depth <= MAX_KEY_DEPTH {
                    self.keys.pop();
                }
                self.expect_key = false;
                self.last_key = None;
            }
            _ => {}
        }
    }

    fn key_byte(&mut self, b: u8) {
        if self.string_is_key {
            if self.key.len() < MAX_KEY_LEN {
                self.key.push(b);
            } else {
                self.key_too_long = true;
            }
        }
    }

    /// The captures of a finished document (a capture still open is a truncated document).
    fn finish(mut self) -> Captures {
        if self.capture.is_some() {
            self.capture = None;
            self.found.push((At::Top, Err("the usage object is cut off".into())));
        }
        self.found
    }
}

/// One token count of a usage object: absent, or a plausible non-negative integer.
fn count(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_TOKENS => Ok(Some(n)),
            _ => Err(format!("usage.{key} is not a plausible token count: {}", truncate(&v.to_string()))),
        },
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= 40 {
        return s.to_string();
    }
    let mut end = 40;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The fields one usage object gives (each may be absent).
#[derive(Debug, Default, Clone, Copy)]
struct Partial {
    input: Option<u64>,
    output: Option<u64>,
    total: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
}

fn read_usage(format: UsageFormat, bytes: &[u8]) -> Result<Option<Partial>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("the usage object is not valid JSON ({e})"))?;
    let obj = match v {
        // OpenAI stream chunks before the last carry `"usage": null`.
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        other => return Err(format!("usage is not an object: {}", truncate(&other.to_string()))),
    };
    let (input, output, cache_creation, cache_read) = match format {
        UsageFormat::OpenAi => (
            count(&obj, "prompt_tokens")?.or(count(&obj, "input_tokens")?),
            count(&obj, "completion_tokens")?.or(count(&obj, "output_tokens")?),
            None,
            None,
        ),
        UsageFormat::Anthropic => (
            count(&obj, "input_tokens")?,
            count(&obj, "output_tokens")?,
            count(&obj, "cache_creation_input_tokens")?,
            count(&obj, "cache_read_input_tokens")?,
        ),
    };
    Ok(Some(Partial { input, output, total: count(&obj, "total_tokens")?, cache_creation, cache_read }))
}

#[derive(Debug)]
enum Mode {
    Json(Scanner),
    Sse(Sse),
    /// Not read; the reason.
    Off(String),
}

/// Server-sent events: the line state and the scanner of the current event's `data`.
#[derive(Debug, Default)]
struct Sse {
    /// The field name of the current line so far (bounded), until its `:`.
    field: Vec<u8>,
    /// In the value of a line (after the field's `:`).
    in_value: bool,
    /// The current line is a `data` line.
    data_line: bool,
    /// Skip one space after `data:`.
    skip_space: bool,
    /// The previous byte was `\r` (a following `\n` ends the same line).
    after_cr: bool,
    /// The current line has any byte.
    line_has_bytes: bool,
    /// The event has data.
    event_has_data: bool,
    /// The start of the current event's data and `event` name (bounded), to spot the last
    /// event of a stream.
    data_head: Vec<u8>,
    event_name: Vec<u8>,
    /// The stream's final event passed (`data: [DONE]`, `event: message_stop`).
    done: bool,
    scanner: Scanner,
}

/// Reads one response's token usage as it streams past.
#[derive(Debug)]
pub struct UsageParser {
    format: UsageFormat,
    mode: Mode,
    input: Option<u64>,
    output: Option<u64>,
    total: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    /// The first malformed usage seen (a later valid one does not erase it).
    error: Option<String>,
    seen: bool,
}

impl UsageParser {
    /// A parser for a response with these headers.
    pub fn new(format: UsageFormat, headers: &HeaderMap) -> UsageParser {
        let encoding = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_ascii_lowercase())
            .find(|v| !v.is_empty() && v != "identity");
        let sse = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"));
        let mode = match encoding {
            Some(enc) => Mode::Off(format!("the response is content-encoded ({enc}); usage not read")),
            None if sse => Mode::Sse(Sse::default()),
            None => Mode::Json(Scanner::default()),
        };
        UsageParser {
            format,
            mode,
            input: None,
            output: None,
            total: None,
            cache_creation: None,
            cache_read: None,
            error: None,
            seen: false,
        }
    }

    /// Feeds the next chunk of the body.
    pub fn feed(&mut self, data: &[u8]) {
        let mut events = Vec::new();
        match &mut self.mode {
            Mode::Off(_) => {}
            Mode::Json(s) => s.feed(data),
            Mode::Sse(sse) => {
                for &b in data {
                    if let Some(found) = sse.byte(b) {
                        events.push(found);
                    }
                }
            }
        }
        for found in events {
            self.take(found);
        }
    }

    fn take(&mut self, found: Captures) {
        for (_, r) in found {
            let parsed = r.and_then(|bytes| read_usage(self.format, &bytes));
            match parsed {
                Ok(Some(p)) => {
                    self.seen = true;
                    // The last value of each field wins (Anthropic: input from message_start,
                    // output from the last message_delta).
                    self.input = p.input.or(self.input);
                    self.output = p.output.or(self.output);
                    self.total = p.total.or(self.total);
                    self.cache_creation = p.cache_creation.or(self.cache_creation);
                    self.cache_read = p.cache_read.or(self.cache_read);
                }
                Ok(None) => {}
                Err(e) => {
                    self.error.get_or_insert(e);
                }
            }
        }
    }

    /// Whether an event stream's final event (`data: [DONE]`, Anthropic `event: message_stop`)
    /// has passed: the usage is complete, whatever else the connection carries. SDKs stop
    /// reading there (openai-python closes the response at `[DONE]`), so the outcome is
    /// written then rather than when the connection ends.
    pub fn stream_done(&self) -> bool {
        matches!(&self.mode, Mode::Sse(sse) if sse.done)
    }

    /// Whether the response's usage is being read (not a content-encoded body).
    pub(crate) fn is_reading(&self) -> bool {
        !matches!(self.mode, Mode::Off(_))
    }

    /// An event stream whose final event has not passed: its usage so far may be partial
    /// (Anthropic's output count grows with every `message_delta`).
    pub(crate) fn stream_unfinished(&self) -> bool {
        matches!(&self.mode, Mode::Sse(sse) if !sse.done)
    }

    /// The tokens seen so far (input, cache and output), for a response cut short: a floor for
    /// what it is charged.
    pub(crate) fn seen_so_far(&self) -> u64 {
        let parts = [self.input, self.cache_creation, self.cache_read, self.output];
        let sum = parts.into_iter().flatten().fold(0u64, u64::saturating_add);
        sum.max(self.total.unwrap_or(0)).min(MAX_TOKENS)
    }

    /// The usage of the whole response, or why it is unknown.
    pub fn finish(mut self) -> Result<Usage, String> {
        let mode = std::mem::replace(&mut self.mode, Mode::Off(String::new()));
        match mode {
            Mode::Off(reason) => return Err(reason),
            Mode::Json(s) => self.take(s.finish()),
            Mode::Sse(mut sse) => {
                // A stream that ends without a final blank line still ends its last event.
                if let Some(found) = sse.end_event() {
                    self.take(found);
                }
            }
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        if !self.seen {
            return Err(match self.format {
                UsageFormat::OpenAi => {
                    "the response carries no usage (streams report it with stream_options.include_usage)".into()
                }
                UsageFormat::Anthropic => "the response carries no usage".into(),
            });
        }
        // Embeddings report no output: input and a total are enough.
        let output = self.output.or_else(|| self.total.zip(self.input).map(|(t, i)| t.saturating_sub(i)));
        let (Some(input), Some(output)) = (self.input, output) else {
            return Err("the usage lacks input or output tokens".into());
        };
        let implausible = "the token counts are not plausible";
        // Prompt-cache writes and reads are input the call is billed for (Anthropic reports them
        // apart from input_tokens).
        let input = [self.cache_creation, self.cache_read]
            .into_iter()
            .flatten()
            .try_fold(input, u64::checked_add)
            .filter(|s| *s <= MAX_TOKENS)
            .ok_or(implausible)?;
        let sum = input.checked_add(output).filter(|s| *s <= MAX_TOKENS).ok_or(implausible)?;
        // An upstream total below input + output would undercount: the sum is the floor.
        let total = self.total.map_or(sum, |t| t.max(sum));
        Ok(Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: total,
            cache_creation_input_tokens: self.cache_creation,
            cache_read_input_tokens: self.cache_read,
        })
    }
}

impl Sse {
    /// Ends the current event; its captures, if it had data.
    fn end_event(&mut self) -> Option<Captures> {
        let data = std::mem::take(&mut self.data_head);
        let name = std::mem::take(&mut self.event_name);
        if data.trim_ascii_end() == b"[DONE]" || name == b"message_stop" {
            self.done = true;
        }
        let had = std::mem::take(&mut self.event_has_data);
        let scanner = std::mem::take(&mut self.scanner);
        had.then(|| scanner.finish())
    }

    fn end_line(&mut self) -> Option<Captures> {
        let blank = !self.line_has_bytes;
        if self.data_line {
            // Lines of one event's data are joined by a newline.
            self.scanner.byte(b'\n');
        }
        self.field.clear();
        self.in_value = false;
        self.data_line = false;
        self.skip_space = false;
        self.line_has_bytes = false;
        if blank { self.end_event() } else { None }
    }

    fn byte(&mut self, b: u8) -> Option<Captures> {
        let after_cr = std::mem::take(&mut self.after_cr);
        match b {
            b'\n' if after_cr => None,
            b'\n' => self.end_line(),
            b'\r' => {
                self.after_cr = true;
                self.end_line()
            }
            _ => {
                self.line_has_bytes = true;
                if self.in_value {
                    if std::mem::take(&mut self.skip_space) && b == b' ' {
                        return None;
                    }
                    if self.data_line {
                        if self.data_head.len() < 16 {
                            self.data_head.push(b);
                        }
                        self.scanner.byte(b);
                    } else if self.field == b"event" && self.event_name.len() < 32 {
                        self.event_name.push(b);
                    }
                } else if b == b':' {
                    self.in_value = true;
                    if self.field == b"event" {
                        self.event_name.clear();
                    }
                    self.data_line = self.field == b"data";
                    self.skip_space = true;
                    if self.data_line {
                        self.event_has_data = true;
                    }
                } else if self.field.len() < 8 {
                    self.field.push(b);
                } else {
                    // A field name this long is none we read; its value is skipped.
                    self.field.clear();
                    self.field.extend_from_slice(b"-ignored");
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
