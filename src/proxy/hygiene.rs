//! Header hygiene: hop-by-hop and `proxy-*` headers are stripped in both directions,
//! `x-uapk-*` request headers are consumed, and recorded headers have secrets hashed.

use http::HeaderMap;
use http::header::{self, HeaderName};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

fn strip_common(h: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    let extra: Vec<HeaderName> =
        h.keys().filter(|k| k.as_str() == "keep-alive" || k.as_str().starts_with("proxy-")).cloned().collect();
    for n in extra {
        h.remove(n);
    }
}

/// The protocol an HTTP/1.1 upgrade request asks for (`Connection: upgrade` + `Upgrade`).
pub fn requested_upgrade(h: &HeaderMap) -> Option<http::HeaderValue> {
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks { h.get(header::UPGRADE).cloned() } else { None }
}

/// Prepares agent headers for the upstream. `Host` is dropped: the client sets it from the
/// upstream URI.
pub fn strip_request(h: &mut HeaderMap) {
    strip_common(h);
    h.remove(header::HOST);
    let ours: Vec<HeaderName> = h.keys().filter(|k| k.as_str().starts_with("x-uapk-")).cloned().collect();
    for n in ours {
        h.remove(n);
    }
}

pub fn strip_response(h: &mut HeaderMap) {
    strip_common(h);
}

/// The request headers as recorded: redacted ones (and every credential-bearing header) as
/// `sha256:<hex>`, the rest verbatim, bounded in size.
pub fn recorded_headers(h: &HeaderMap, redact: &[String]) -> Map<String, Value> {
    const ALWAYS: [&str; 5] =
        ["authorization", "proxy-authorization", "cookie", "x-uapk-capability", "x-uapk-override"];
    let mut out = Map::new();
    let mut budget = 4096usize;
    for (name, value) in h {
        let n = name.as_str();
        let shown = if ALWAYS.contains(&n) || redact.iter().any(|r| r == n) {
            format!("sha256:{}", hex::encode(Sha256::digest(value.as_bytes())))
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        if shown.len() + n.len() > budget {
            out.insert("x-uapk-truncated".into(), Value::String("true".into()));
            break;
        }
        budget -= shown.len() + n.len();
        match out.get_mut(n) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&shown);
            }
            _ => {
                out.insert(n.to_string(), Value::String(shown));
            }
        }
    }
    out
}
