//! Reads a route's declared params from the request (JSON body, header, query, path capture).
//! Amounts fail closed: a declared amount that is missing, negative, not a plain decimal or
//! out of range is an error, never skipped. Money is `Decimal`, never a float.

use crate::config::{ParamSource, Route};
use http::HeaderMap;
use rust_decimal::Decimal;
use std::collections::BTreeMap;

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
    /// The `currency` param, upper-case.
    pub currency: Option<String>,
}

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }
    pub fn declares(&self, name: &str) -> bool {
        self.declared.iter().any(|d| d == name)
    }
}

/// A plain non-negative decimal: digits with at most one '.', nothing else.
fn parse_plain_decimal(s: &str, scale: Option<u32>) -> Result<Decimal, String> {
    let s = s.trim();
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

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
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

/// Extracts `route`'s params. `captures` are the path captures of the route match; `query` is
/// the raw query string; `body` is the buffered body when the route reads JSON params.
pub fn extract_params(
    route: &Route,
    captures: &[(String, String)],
    headers: &HeaderMap,
    query: Option<&str>,
    body: Option<&[u8]>,
) -> Params {
    let mut out = Params::default();
    let mut json: Option<Result<serde_json::Value, String>> = None;
    for spec in &route.params {
        out.declared.push(spec.name.clone());
        let is_amount = spec.name == "amount";
        let raw: Result<Option<RawValue>, String> = match &spec.source {
            ParamSource::Json(ptr) => {
                let doc = json.get_or_insert_with(|| match body {
                    None => Err("the request has no body".to_string()),
                    Some(b) => {
                        serde_json::from_slice(b).map_err(|e| format!("the request body is not valid JSON ({e})"))
                    }
                });
                match doc {
                    Ok(doc) => Ok(doc.pointer(ptr).cloned().map(RawValue::Json)),
                    Err(e) => Err(e.clone()),
                }
            }
            ParamSource::Header(h) => {
                let mut vals = headers.get_all(h).iter();
                match (vals.next(), vals.next()) {
                    (None, _) => Ok(None),
                    (Some(_), Some(_)) => Err(format!("header {h} appears more than once")),
                    (Some(v), None) => match v.to_str() {
                        Ok(s) => Ok(Some(RawValue::Text(s.to_string()))),
                        Err(_) => Err(format!("header {h} is not valid text")),
                    },
                }
            }
            ParamSource::Query(name) => {
                let mut found = url::form_urlencoded::parse(query.unwrap_or("").as_bytes()).filter(|(k, _)| k == name);
                match (found.next(), found.next()) {
                    (None, _) => Ok(None),
                    (Some(_), Some(_)) => Err(format!("query param {name} appears more than once")),
                    (Some((_, v)), None) => Ok(Some(RawValue::Text(v.into_owned()))),
                }
            }
            ParamSource::Path(name) => Ok(captures.iter().find(|(n, _)| n == name).map(|(_, v)| {
                RawValue::Text(percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned())
            })),
        };
        if is_amount {
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
        if let Some(mut v) = value {
            if spec.name == "currency" {
                v = v.trim().to_ascii_uppercase();
                out.currency = Some(v.clone());
            }
            out.values.insert(spec.name.clone(), v);
        }
    }
    out
}

enum RawValue {
    Json(serde_json::Value),
    Text(String),
}
