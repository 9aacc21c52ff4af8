//! The form-body and query-string param readers (`policy::extract_params` with `form:` and
//! `query:` sources) on what an agent sends.
//!
//! Input: the form body, and (read as text) the query string, of a request to routes that read
//! `amount`, `currency`, `customer`, `metadata[order_id]` and `a b` from them.
//!
//! Invariants: never a panic; a value read for a key was sent under exactly that key (after
//! percent-decoding, `+` as a space in a form) and is that pair's value, trimmed; a key sent
//! twice (with `&` or `;` between) is never read; a query value read never had a raw `+`; an
//! amount read is a non-negative decimal, recorded as read.
#![no_main]
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use uapk_gateway::config::{Manifest, Route, Strictness, parse_manifest};
use uapk_gateway::policy::extract_params;

/// Route params: (param name, key it is read from).
const PARAMS: [(&str, &str); 5] = [
    ("amount", "amount"),
    ("currency", "currency"),
    ("counterparty", "customer"),
    ("order", "metadata[order_id]"),
    ("note", "a b"),
];

const MANIFEST: &str = r#"apiVersion: uapk/v1
kind: Manifest
agent:
  id: fuzz-agent
capability:
  required: false
connectors:
  - name: pay
    base_url: https://pay.example
    hosts: [pay.example]
    routes:
      - methods: [POST]
        path: /form
        action: payment.refund
        params:
          amount:       { form: amount }
          currency:     { form: currency }
          counterparty: { form: customer }
          order:        { form: "metadata[order_id]" }
          note:         { form: "a b" }
      - methods: [GET]
        path: /query
        action: payment.refund
        params:
          amount:       { query: amount, scale: 2 }
          currency:     { query: currency }
          counterparty: { query: customer }
          order:        { query: "metadata[order_id]" }
          note:         { query: "a b" }
"#;

fn manifest() -> &'static Manifest {
    static M: OnceLock<Manifest> = OnceLock::new();
    M.get_or_init(|| {
        parse_manifest(Path::new("fuzz.yaml"), MANIFEST.as_bytes(), Path::new("/nonexistent"), Strictness::Run)
            .map(|(m, _)| m)
            .unwrap_or_else(|e| panic!("the fuzz manifest is invalid: {e:?}"))
    })
}

/// Percent-decoding as RFC 3986 / WHATWG forms read it (a bad escape is kept as is), lossy UTF-8.
fn decode(s: &str, plus_is_space: bool) -> String {
    let s = if plus_is_space { s.replace('+', " ") } else { s.to_string() };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn trim(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_whitespace())
}

/// Every (decoded key, decoded value, raw pair) of the text, pairs split at `seps`.
fn pairs<'a>(text: &'a str, seps: &[char], plus_is_space: bool) -> Vec<(String, String, &'a str)> {
    text.split(seps)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k, plus_is_space), decode(v, plus_is_space), p)
        })
        .collect()
}

fn check(route: &Route, text: &str, is_form: bool) {
    let params = if is_form {
        extract_params(route, &[], &HeaderMap::new(), None, Some(text.as_bytes()))
    } else {
        extract_params(route, &[], &HeaderMap::new(), Some(text), None)
    };
    let amp = pairs(text, &['&'], is_form);
    let both = pairs(text, &['&', ';'], is_form);
    for (name, key) in PARAMS {
        let sent: Vec<_> = amp.iter().filter(|(k, _, _)| k == key).collect();
        let twice = both.iter().filter(|(k, _, _)| k == key).count() > 1;
        if twice {
            assert!(params.get(name).is_none(), "{name}: {key:?} sent twice, yet read: {:?}", params.get(name));
        }
        if name == "amount" {
            if let Some(d) = params.amount {
                assert!(!d.is_sign_negative() || d.is_zero(), "negative amount {d}");
                assert_eq!(params.get("amount"), Some(d.to_string().as_str()));
                assert!(sent.len() == 1, "amount read though {key:?} was sent {} times", sent.len());
                assert!(params.amount_error.is_none());
            } else {
                assert!(params.get("amount").is_none());
            }
            continue;
        }
        let Some(v) = params.get(name) else { continue };
        assert!(!v.is_empty() && trim(v) == v, "{name}: untrimmed or empty value {v:?}");
        let from = sent.iter().find(|(_, val, _)| {
            let val = trim(val);
            if name == "currency" { val.to_ascii_uppercase() == v } else { val == v }
        });
        let Some((_, _, raw)) = from else {
            panic!("{name}: {v:?} read, but no pair sent it under {key:?} in {text:?}");
        };
        if !is_form {
            assert!(!raw.contains('+'), "{name}: query value read from a pair with a raw '+': {raw:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let m = manifest();
    let routes = &m.connectors[0].routes;
    let text = String::from_utf8_lossy(data);
    check(&routes[0], &text, true);
    check(&routes[1], &text, false);
});
