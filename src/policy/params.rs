//! Reads a route's declared params from the request the way the upstream will read it (JSON or
//! form body by media type, header, query, path capture, fixed value), and refuses to guess:
//! a source that yields two readings makes the param *ambiguous* (`param_ambiguous`), never
//! "the first" or "the last" value.
//!
//! Amounts fail closed: a declared amount that is missing, negative, not a plain decimal or out
//! of range is an error, never skipped. Money is `Decimal`, never a float. Values are trimmed of
//! ASCII whitespace; an empty value is a missing one.

use super::{Code, Decision};
use crate::config::{BodyFormat, ParamSource, Route};
use http::{HeaderMap, header};
use rust_decimal::Decimal;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;

/// Params read from one request.
#[derive(Debug, Default, Clone)]
pub struct Params {
    /// Every param found, as strings (amount as a normalised decimal, currency upper-case).
    pub values: BTreeMap<String, String>,
    declared: Vec<String>,
    /// The `amount` param, when the route declares one and it is valid.
    pub amount: Option<Decimal>,
    /// Why a declared `amount` could not be read.
    pub amount_error: Option<String>,
    /// The `currency` param, trimmed and upper-case (not yet checked to be an ISO-4217 code).
    pub currency: Option<String>,
    /// Why a declared param has more than one reading (the first such param).
    pub ambiguous: Option<String>,
}

impl Params {
    /// The value read for the param `name`, if any (an amount as a normalised decimal, a currency
    /// upper-case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }
    pub(crate) fn declares(&self, name: &str) -> bool {
        self.declared.iter().any(|d| d == name)
    }
}

// ---------------------------------------------------------------- media types

/// A parsed `Content-Type`: lower-case `type/subtype` and whether its charset (if any) is UTF-8.
fn parse_media_type(v: &str) -> Result<String, String> {
    let mut parts = v.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b));
    match essence.split_once('/') {
        Some((t, s)) if token(t) && token(s) => {}
        _ => return Err(format!("Content-Type {:?} is not a media type", truncate(v))),
    }
    let mut charset_seen = false;
    for p in parts {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        let Some((name, value)) = p.split_once('=') else {
            return Err(format!("Content-Type parameter {:?} is malformed", truncate(p)));
        };
        if name.trim().eq_ignore_ascii_case("charset") {
            let value = value.trim().trim_matches('"');
            if charset_seen || !value.eq_ignore_ascii_case("utf-8") {
                return Err(format!("charset {:?} is not the single utf-8 the gateway reads", truncate(value)));
            }
            charset_seen = true;
        }
    }
    Ok(essence)
}

fn format_of(essence: &str) -> Option<BodyFormat> {
    if essence == "application/json" || essence.split_once('/').is_some_and(|(_, sub)| sub.ends_with("+json")) {
        Some(BodyFormat::Json)
    } else if essence == "application/x-www-form-urlencoded" {
        Some(BodyFormat::Form)
    } else {
        None
    }
}

/// A route that reads body params reads them only from a body of its declared media type:
/// any other media type, a non-empty body without a `Content-Type`, or an encoded body is
/// `unsupported_media_type` (415); two `Content-Type` headers are `param_ambiguous`.
pub(crate) fn check_body_media_type(route: &Route, headers: &HeaderMap, body: &[u8]) -> Result<(), Decision> {
    match route.body_format() {
        Some(want) => check_media_type(want, "this route reads its params from", headers, body),
        None => Ok(()),
    }
}

/// The body must be of the `want` media type (an empty body has none to check); `what` says
/// who reads it, for the refusal's message.
pub(crate) fn check_media_type(want: BodyFormat, what: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), Decision> {
    let unsupported = |why: String| {
        Decision::deny(Code::UnsupportedMediaType, format!("{what} an {} body: {why}", want.media_type()))
    };
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    let ct = match (types.next(), types.next()) {
        (_, Some(_)) => {
            return Err(Decision::deny(Code::ParamAmbiguous, "the request has more than one Content-Type header"));
        }
        (None, None) => None,
        (Some(v), None) => Some(v.to_str().map_err(|_| unsupported("the Content-Type is not valid text".into()))?),
    };
    if body.is_empty() {
        return Ok(());
    }
    for enc in headers.get_all(header::CONTENT_ENCODING) {
        let identity = enc.to_str().is_ok_and(|e| e.split(',').all(|e| e.trim().eq_ignore_ascii_case("identity")));
        if !identity {
            return Err(unsupported("the body has a Content-Encoding; send it unencoded".into()));
        }
    }
    let Some(ct) = ct else {
        return Err(unsupported("the body has no Content-Type".into()));
    };
    let essence = parse_media_type(ct).map_err(unsupported)?;
    match format_of(&essence) {
        Some(f) if f == want => Ok(()),
        _ => Err(unsupported(format!("the body is {}", truncate(&essence)))),
    }
}

// ---------------------------------------------------------------- JSON with duplicates kept

/// A JSON document that keeps every member of an object, duplicates included, so a pointer
/// can tell "one value" from "two values under one key" (serde_json keeps the last).
#[derive(Debug)]
enum Node {
    Scalar(serde_json::Value),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Scalar(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Scalar(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Scalar(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Scalar(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Scalar(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Scalar(v.into()))
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar(serde_json::Value::Null))
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar(serde_json::Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element()? {
            items.push(n);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut members = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Node>()? {
            members.push((k, v));
        }
        Ok(Node::Object(members))
    }
}

/// Unicode simple case folding as lenient decoders match keys (Go's encoding/json folds case,
/// and `ſ` folds to `s`): two keys that fold alike may be one key to the upstream.
fn fold(s: &str) -> String {
    s.chars().flat_map(char::to_uppercase).flat_map(char::to_lowercase).collect()
}

fn same_key(sent: &str, wanted: &str) -> bool {
    sent == wanted || fold(sent) == fold(wanted)
}

/// Resolves an RFC 6901 pointer. Two members on the way whose keys match the step (exactly, or
/// up to case folding), or one that matches only up to case, make the value ambiguous.
fn resolve<'a>(doc: &'a Node, ptr: &str) -> Result<Option<&'a Node>, String> {
    let Some(rest) = ptr.strip_prefix('/') else {
        return Ok(if ptr.is_empty() { Some(doc) } else { None });
    };
    let mut cur = doc;
    let mut walked = String::new();
    for raw in rest.split('/') {
        let step = raw.replace("~1", "/").replace("~0", "~");
        walked.push('/');
        walked.push_str(raw);
        cur = match cur {
            Node::Object(members) => {
                let mut hits = members.iter().filter(|(k, _)| same_key(k, &step));
                match (hits.next(), hits.next()) {
                    (None, _) => return Ok(None),
                    (Some(_), Some(_)) => {
                        return Err(format!(
                            "the JSON body has the key {:?} more than once at {walked}",
                            truncate(&step)
                        ));
                    }
                    (Some((k, _)), None) if *k != step => {
                        return Err(format!(
                            "the JSON body has {:?} where {:?} is read (differs only in case) at {walked}",
                            truncate(k),
                            truncate(&step)
                        ));
                    }
                    (Some((_, v)), None) => v,
                }
            }
            Node::Array(items) => {
                let index = (!step.is_empty()
                    && step.bytes().all(|b| b.is_ascii_digit())
                    && (step == "0" || !step.starts_with('0')))
                .then(|| step.parse::<usize>().ok())
                .flatten();
                match index.and_then(|i| items.get(i)) {
                    Some(v) => v,
                    None => return Ok(None),
                }
            }
            Node::Scalar(_) => return Ok(None),
        };
    }
    Ok(Some(cur))
}

/// A JSON document read with the rules params are read with: a key that appears twice (or
/// twice up to case) on the way to a value makes that value ambiguous. Used for the fields a
/// JSON-RPC message is routed by (`method`, `params.name`, `id`).
pub(crate) struct JsonDoc(Node);

impl JsonDoc {
    pub(crate) fn parse(body: &[u8]) -> Result<JsonDoc, String> {
        serde_json::from_slice::<Node>(body).map(JsonDoc).map_err(|e| format!("the body is not valid JSON ({e})"))
    }

    pub(crate) fn is_array(&self) -> bool {
        matches!(self.0, Node::Array(_))
    }

    pub(crate) fn is_object(&self) -> bool {
        matches!(self.0, Node::Object(_))
    }

    /// The scalar at `ptr` (`Ok(None)` when absent; an object or array is `Err`), or why it
    /// has more than one reading.
    pub(crate) fn scalar(&self, ptr: &str) -> Result<Option<&serde_json::Value>, String> {
        match resolve(&self.0, ptr)? {
            None => Ok(None),
            Some(Node::Scalar(v)) => Ok(Some(v)),
            Some(_) => Err(format!("{ptr} is not a single value")),
        }
    }

    /// Whether anything (even an object) is at `ptr`.
    pub(crate) fn has(&self, ptr: &str) -> Result<bool, String> {
        resolve(&self.0, ptr).map(|n| n.is_some())
    }
}

// ---------------------------------------------------------------- form and query pairs

fn decode(s: &str, plus_is_space: bool) -> String {
    if plus_is_space {
        percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
    } else {
        percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
    }
}

/// A key of `text` that is `name` followed by brackets (`customer[]`, `customer[0]`,
/// `customer[x]`, up to case and encoding, `&` or `;` separated): PHP, Rails, `qs` and others
/// read it as `name` itself (an array or map), so a read param sent that way too has two
/// readings, and one sent only that way would go past the policy unread.
fn bracketed(text: &str, name: &str, plus_is_space: bool) -> Option<String> {
    text.split(['&', ';']).find_map(|piece| {
        let k = piece.split_once('=').map_or(piece, |(k, _)| k);
        let readings = [decode(k, plus_is_space), decode(k, true)];
        readings.into_iter().find(|key| {
            key.match_indices('[').any(|(i, _)| i > 0 && same_key(&key[..i], name) && key[i..].contains(']'))
        })
    })
}

/// Reads `name` from `application/x-www-form-urlencoded` text (a form body, `plus_is_space`) or
/// a query string. Fails closed wherever servers disagree: `;` separates pairs for some of them,
/// so the text is read both ways and must give one and the same value; keys that differ only in
/// case count as the same key; in a query, a raw `+` is a space to some servers and a plus to
/// others, so a read query param that contains one is ambiguous (send `%20` or `%2B`).
fn read_pairs(text: &str, name: &str, plus_is_space: bool, what: &str) -> Read {
    if let Some(k) = bracketed(text, name, plus_is_space) {
        return Read::Ambiguous(format!(
            "{what} {:?} is sent as {:?} (the same param, as an array or map, to bracket-aware servers)",
            truncate(name),
            truncate(&k)
        ));
    }
    let matching = |seps: &[char]| -> Vec<(String, String, &str)> {
        text.split(seps)
            .filter(|piece| !piece.is_empty())
            .filter_map(|piece| {
                let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
                let key = decode(k, plus_is_space);
                let hit = same_key(&key, name) || (!plus_is_space && same_key(&decode(k, true), name));
                hit.then(|| (key, decode(v, plus_is_space), piece))
            })
            .collect()
    };
    let amp = matching(&['&']);
    let semi = matching(&['&', ';']);
    if amp.len() > 1 || semi.len() > 1 {
        return Read::Ambiguous(format!("{what} {:?} appears more than once", truncate(name)));
    }
    if let Some((k, _, _)) = amp.iter().chain(&semi).find(|(k, _, _)| k != name) {
        return Read::Ambiguous(format!(
            "{what} {:?} is sent where {:?} is read (differs only in case or encoding)",
            truncate(k),
            truncate(name)
        ));
    }
    if !plus_is_space && amp.iter().chain(&semi).any(|(_, _, raw)| raw.contains('+')) {
        return Read::Ambiguous(format!(
            "{what} {:?} contains a raw '+' (a space to some servers, a plus to others); send %20 or %2B",
            truncate(name)
        ));
    }
    match (amp.first(), semi.first()) {
        (None, None) => Read::Missing,
        (Some(a), Some(b)) if a.1 == b.1 => Read::One(RawValue::Text(a.1.clone())),
        _ => Read::Ambiguous(format!("{what} {:?} reads differently when ';' separates pairs", truncate(name))),
    }
}

// ---------------------------------------------------------------- values

/// A plain non-negative decimal: digits with at most one '.', nothing else.
fn parse_plain_decimal(s: &str, scale: Option<u32>) -> Result<Decimal, String> {
    let s = trim_ascii(s);
    let valid = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && s.bytes().filter(|&b| b == b'.').count() <= 1
        && !s.starts_with('.')
        && !s.ends_with('.');
    if !valid {
        return Err(format!("amount {:?} is not a non-negative decimal number", truncate(s)));
    }
    if scale.is_some() && s.contains('.') {
        return Err(format!("amount {s:?} must be an integer in minor units"));
    }
    let mut d = Decimal::from_str_exact(s).map_err(|_| format!("amount {:?} is out of range", truncate(s)))?;
    if let Some(scale) = scale {
        d.set_scale(scale).map_err(|_| format!("amount {:?} cannot take scale {scale}", truncate(s)))?;
    }
    Ok(d.normalize())
}

/// A decimal param value for `min`/`max` constraints: an optional `-`, digits, at most one `.`.
pub(crate) fn parse_decimal_value(s: &str) -> Option<Decimal> {
    let s = trim_ascii(s);
    let digits = s.strip_prefix('-').unwrap_or(s);
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1
        && !digits.starts_with('.')
        && !digits.ends_with('.');
    if ok { Decimal::from_str_exact(s).ok() } else { None }
}

/// Format characters (Unicode category Cf, as of Unicode 15.1) and the other default-ignorable
/// code points (variation selectors, Hangul fillers, tags): invisible when shown, and dropped
/// by some upstreams' sanitising, so `cus_\u{200b}blocked` is a list's `cus_blocked` to them.
/// Sorted, inclusive ranges.
const INVISIBLE: [(u32, u32); 25] = [
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
];

/// The first character of `v` that makes it unfit to match against a list (SPEC §16.4): a
/// control character (U+0000–U+001F, U+007F–U+009F, which C-string and trimming upstreams cut
/// at or drop), an invisible format character ([`INVISIBLE`]), or whitespace beyond ASCII
/// (U+00A0, U+2028, U+3000…, which `str.strip()` and the like trim).
pub(crate) fn invalid_char(v: &str) -> Option<char> {
    v.chars().find(|&c| {
        let n = u32::from(c);
        c.is_control()
            || (!c.is_ascii() && c.is_whitespace())
            || INVISIBLE
                .binary_search_by(|&(lo, hi)| {
                    if hi < n {
                        std::cmp::Ordering::Less
                    } else if lo > n {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                })
                .is_ok()
    })
}

pub(crate) fn trim_ascii(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_whitespace())
}

pub(crate) fn truncate(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(40).collect()
}

fn amount_from_json(v: &serde_json::Value, scale: Option<u32>) -> Result<Decimal, String> {
    match v {
        serde_json::Value::Number(n) => {
            let text = n.to_string();
            if n.is_f64() {
                // Floats lose precision; only accept ones that print as a plain decimal.
                if text.contains(['e', 'E']) || scale.is_some() && !text.ends_with(".0") {
                    return Err(format!("amount {text} is not an exact decimal"));
                }
                let text = if scale.is_some() { text.trim_end_matches(".0").to_string() } else { text };
                return parse_plain_decimal(&text, scale);
            }
            if text.starts_with('-') {
                return Err(format!("amount {text} is negative"));
            }
            parse_plain_decimal(&text, scale)
        }
        serde_json::Value::String(s) => parse_plain_decimal(s, scale),
        other => Err(format!("amount must be a number, found {}", json_kind(other))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn json_to_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

enum RawValue {
    Json(serde_json::Value),
    Text(String),
}

/// What one source yields for one param.
enum Read {
    Missing,
    One(RawValue),
    /// More than one reading is possible: refused, never guessed.
    Ambiguous(String),
    /// The source cannot be read (e.g. the body is not JSON).
    Unreadable(String),
}

/// Extracts `route`'s params. `captures` are the path captures of the route match; `query` is
/// the raw query string; `body` is the buffered body when the route reads body params (its
/// media type was checked by `check_body_media_type`).
pub fn extract_params(
    route: &Route,
    captures: &[(String, String)],
    headers: &HeaderMap,
    query: Option<&str>,
    body: Option<&[u8]>,
) -> Params {
    let mut out = Params::default();
    let mut json: Option<Result<Node, String>> = None;
    let mut form: Option<std::borrow::Cow<str>> = None;
    for spec in &route.params {
        out.declared.push(spec.name.clone());
        let read = match &spec.source {
            ParamSource::Json(ptr) => {
                let doc = json.get_or_insert_with(|| match body {
                    None | Some([]) => Err("the request has no body".to_string()),
                    Some(b) => serde_json::from_slice::<Node>(b)
                        .map_err(|e| format!("the request body is not valid JSON ({e})")),
                });
                match doc {
                    Err(e) => Read::Unreadable(e.clone()),
                    Ok(doc) => match resolve(doc, ptr) {
                        Err(why) => Read::Ambiguous(why),
                        Ok(None) => Read::Missing,
                        Ok(Some(Node::Scalar(v))) => Read::One(RawValue::Json(v.clone())),
                        Ok(Some(Node::Array(_))) => Read::One(RawValue::Json(serde_json::Value::Array(Vec::new()))),
                        Ok(Some(Node::Object(_))) => {
                            Read::One(RawValue::Json(serde_json::Value::Object(serde_json::Map::new())))
                        }
                    },
                }
            }
            ParamSource::Form(key) => {
                let text = form.get_or_insert_with(|| body.map(String::from_utf8_lossy).unwrap_or_default());
                read_pairs(text, key, true, "form key")
            }
            ParamSource::Query(name) => read_pairs(query.unwrap_or(""), name, false, "query param"),
            ParamSource::Header(h) => {
                let mut vals = headers.get_all(h).iter();
                match (vals.next(), vals.next()) {
                    (None, _) => Read::Missing,
                    (Some(_), Some(_)) => Read::Ambiguous(format!("header {h} appears more than once")),
                    (Some(v), None) => match v.to_str() {
                        // A comma-separated value is what a repeated header folds into (RFC 9110 §5.3).
                        Ok(s) if s.contains(',') => Read::Ambiguous(format!("header {h} carries a list")),
                        Ok(s) => Read::One(RawValue::Text(s.to_string())),
                        Err(_) => Read::Unreadable(format!("header {h} is not valid text")),
                    },
                }
            }
            ParamSource::Path(name) => match captures.iter().find(|(n, _)| n == name) {
                None => Read::Missing,
                Some((_, v)) => Read::One(RawValue::Text(decode(v, false))),
            },
            ParamSource::Value(v) => Read::One(RawValue::Text(v.clone())),
        };
        let raw: Result<Option<RawValue>, String> = match read {
            Read::Ambiguous(why) => {
                if out.ambiguous.is_none() {
                    out.ambiguous = Some(format!("param {}: {why}", spec.name));
                }
                continue;
            }
            Read::Unreadable(e) => Err(e),
            Read::Missing => Ok(None),
            Read::One(v) => Ok(Some(v)),
        };
        if spec.name == "amount" {
            let parsed = match raw {
                Err(e) => Err(e),
                Ok(None) => Err("the route declares an amount but the request carries none".to_string()),
                Ok(Some(RawValue::Json(v))) => amount_from_json(&v, spec.scale),
                Ok(Some(RawValue::Text(s))) => parse_plain_decimal(&s, spec.scale),
            };
            match parsed {
                Ok(d) => {
                    out.values.insert("amount".into(), d.to_string());
                    out.amount = Some(d);
                }
                Err(e) => out.amount_error = Some(e),
            }
            continue;
        }
        let value = match raw {
            Ok(Some(RawValue::Json(v))) => json_to_string(&v),
            Ok(Some(RawValue::Text(s))) => Some(s),
            _ => None,
        };
        let Some(v) = value.map(|v| trim_ascii(&v).to_string()).filter(|v| !v.is_empty()) else { continue };
        let v = if spec.name == "currency" { v.to_ascii_uppercase() } else { v };
        if spec.name == "currency" {
            out.currency = Some(v.clone());
        }
        out.values.insert(spec.name.clone(), v);
    }
    out
}

#[cfg(test)]
mod tests;
