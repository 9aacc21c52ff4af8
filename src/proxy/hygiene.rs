//! Header hygiene: hop-by-hop and `proxy-*` headers are stripped in both directions,
//! `x-uapk-*` request headers are consumed, and recorded headers have secrets hashed.

use crate::config::Connector;
use http::HeaderMap;
use http::header::{self, HeaderName};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

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
pub(super) fn requested_upgrade(h: &HeaderMap) -> Option<http::HeaderValue> {
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks { h.get(header::UPGRADE).cloned() } else { None }
}

/// Credential-bearing headers an agent may send; a connector that injects credentials strips
/// all of them, not only the names it injects, so an agent cannot add a second credential.
const CREDENTIAL_HEADERS: [&str; 5] = ["authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"];

/// Headers that do not bind an override to an action (SPEC §14.7): they vary between an
/// agent's retries without changing what the upstream is asked to do. (`mcp-session-id`, beyond
/// the specification's list: an MCP client retrying an approved call may be in a new session.)
const UNBOUND_HEADERS: [&str; 6] =
    ["traceparent", "tracestate", "user-agent", "accept-encoding", "content-length", "mcp-session-id"];

/// Prepares agent headers for the upstream. `Host` is dropped: the client sets it from the
/// upstream URI. `x-uapk-*` are ours; `forwarded`, `x-forwarded-*` and `x-real-ip` would let an
/// agent speak for the gateway about where a request came from.
pub(super) fn strip_request(h: &mut HeaderMap) {
    strip_common(h);
    h.remove(header::HOST);
    h.remove(header::FORWARDED);
    h.remove("x-real-ip");
    let ours: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-uapk-") || k.as_str().starts_with("x-forwarded-"))
        .cloned()
        .collect();
    for n in ours {
        h.remove(n);
    }
}

/// Whether two header names are one to CGI-style servers (PHP, WSGI, Rack, nginx's
/// `underscores_in_headers` merge `x_api_key` into `X-Api-Key`): equal ignoring ASCII case,
/// with `_` read as `-`. Compares in place (it runs for every header of every request).
fn same_cgi_name(a: &str, b: &str) -> bool {
    let norm = |c: u8| if c == b'_' { b'-' } else { c.to_ascii_lowercase() };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| norm(x) == norm(y))
}

/// The connector's own rules on top of `strip_request`: every agent-supplied credential header
/// when it injects credentials, its `strip_headers`, and the names it injects — each also under
/// any name that reads as it with `_` for `-` (SPEC §16.4), so no second credential goes out
/// beside the injected one.
pub(super) fn strip_for_connector(h: &mut HeaderMap, connector: &Connector) {
    let injected = connector.credentials.as_deref().unwrap_or_default();
    let credentials: &[&str] = if connector.injects_credentials() { &CREDENTIAL_HEADERS } else { &[] };
    let names = connector
        .strip_headers
        .iter()
        .chain(injected.iter().map(|(n, _)| n))
        .map(HeaderName::as_str)
        .chain(credentials.iter().copied());
    let strip: Vec<HeaderName> =
        h.keys().filter(|k| names.clone().any(|n| same_cgi_name(n, k.as_str()))).cloned().collect();
    for n in strip {
        h.remove(n);
    }
}

/// The headers an override is bound to (SPEC §14.7): what would be forwarded, before
/// credentials are injected, less hop-by-hop and the unbound names; lower-case names, sorted,
/// each with its values in order. A value that is not UTF-8 is bound by its hex bytes.
pub(super) fn bound_headers(h: &HeaderMap, connector: &Connector) -> BTreeMap<String, Vec<String>> {
    let mut h = h.clone();
    strip_request(&mut h);
    strip_for_connector(&mut h, connector);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &h {
        if UNBOUND_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let v = match value.to_str() {
            Ok(s) => s.to_string(),
            Err(_) => format!("hex:{}", hex::encode(value.as_bytes())),
        };
        out.entry(name.as_str().to_string()).or_default().push(v);
    }
    out
}

/// Why an upgrade request is refused (SPEC §14.2): only a WebSocket GET may switch protocols;
/// any other token (`h2c`, …) would hand the agent a raw connection to the upstream that no
/// policy reads. (HTTP/2 extended CONNECT never gets here: the gateway does not advertise
/// `SETTINGS_ENABLE_CONNECT_PROTOCOL`, so HTTP/2 refuses `:protocol` and clients fall back to
/// an HTTP/1.1 WebSocket upgrade, which is decided like any GET.)
pub(super) fn upgrade_refusal(method: &http::Method, h: &HeaderMap) -> Option<&'static str> {
    let tokens: Vec<&http::HeaderValue> = h.get_all(header::UPGRADE).iter().collect();
    if tokens.is_empty() {
        return None;
    }
    let websocket = tokens.len() == 1 && tokens[0].to_str().is_ok_and(|t| t.trim().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return Some("only Upgrade: websocket is allowed");
    }
    if method != http::Method::GET {
        return Some("a WebSocket upgrade must be a GET");
    }
    None
}

pub(super) fn strip_response(h: &mut HeaderMap) {
    strip_common(h);
}

/// The request headers as recorded: redacted ones (and every credential-bearing header) as
/// `sha256:<hex>`, the rest verbatim. Size is the audit entry's concern: a long value is stored
/// cut with its hash, and headers too large altogether are dropped whole with theirs (SPEC §14.8).
pub(super) fn recorded_headers(h: &HeaderMap, redact: &[String]) -> Map<String, Value> {
    const ALWAYS: [&str; 5] =
        ["authorization", "proxy-authorization", "cookie", "x-uapk-capability", "x-uapk-override"];
    let mut out = Map::new();
    for (name, value) in h {
        let n = name.as_str();
        // `proxy_authorization` is the same credential to CGI-style servers.
        let always = ALWAYS.iter().any(|a| same_cgi_name(a, n));
        let shown = if always || redact.iter().any(|r| r == n) {
            format!("sha256:{}", hex::encode(Sha256::digest(value.as_bytes())))
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsMode;
    use http::{HeaderValue, Method};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn connector(credentials: &[(&str, &str)], strip: &[&str]) -> Connector {
        Connector {
            name: "c".into(),
            base_url: None,
            hosts: vec![],
            ports: vec![],
            tls: TlsMode::Intercept,
            credentials: Ok(credentials
                .iter()
                .map(|(n, v)| (HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap()))
                .collect()),
            strip_headers: strip.iter().map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()).collect(),
            usage: None,
            usage_estimate: 4096,
            routes: vec![],
            mcp: None,
        }
    }

    #[test]
    fn only_a_websocket_get_may_upgrade() {
        let ws = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert_eq!(upgrade_refusal(&Method::GET, &ws), None);
        assert_eq!(upgrade_refusal(&Method::GET, &headers(&[("upgrade", " WebSocket ")])), None);
        assert!(upgrade_refusal(&Method::POST, &ws).is_some());
        for bad in ["h2c", "websocket, h2c", "HTTP/2.0", "TLS/1.2", ""] {
            assert!(upgrade_refusal(&Method::GET, &headers(&[("upgrade", bad)])).is_some(), "{bad:?}");
        }
        let twice = headers(&[("upgrade", "websocket"), ("upgrade", "h2c")]);
        assert!(upgrade_refusal(&Method::GET, &twice).is_some());
        assert_eq!(upgrade_refusal(&Method::GET, &HeaderMap::new()), None);
    }

    #[test]
    fn forwarding_headers_are_never_the_agents() {
        let mut h = headers(&[
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "1.2.3.4"),
            ("x-uapk-capability", "t"),
            ("accept", "*/*"),
        ]);
        strip_request(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
    }

    #[test]
    fn a_connector_with_credentials_strips_every_credential_header() {
        let agent = [
            ("authorization", "Bearer agent"),
            ("x-api-key", "k"),
            ("api-key", "k"),
            ("cookie", "a=b"),
            ("x-hint", "h"),
            ("x-custom-key", "agent"),
            ("accept", "*/*"),
        ];
        let mut h = headers(&agent);
        strip_for_connector(&mut h, &connector(&[("x-custom-key", "secret")], &["x-hint"]));
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
        // Without credentials, the agent's own authorization stays; strip_headers still apply.
        let mut h = headers(&agent);
        strip_for_connector(&mut h, &connector(&[], &["x-hint"]));
        assert!(h.contains_key("authorization") && h.contains_key("cookie") && !h.contains_key("x-hint"));
        // A connector whose credential source is missing still counts as injecting credentials.
        let mut broken = connector(&[], &[]);
        broken.credentials = Err("missing".into());
        let mut h = headers(&agent);
        strip_for_connector(&mut h, &broken);
        assert!(!h.contains_key("authorization"));
    }

    #[test]
    fn overrides_bind_what_is_forwarded_and_nothing_that_varies_between_retries() {
        let c = connector(&[("authorization", "Bearer injected")], &[]);
        let h = headers(&[
            ("stripe-account", "acct_1"),
            ("idempotency-key", "k1"),
            ("idempotency-key", "k2"),
            ("authorization", "Bearer agent"),
            ("traceparent", "00-1"),
            ("tracestate", "x"),
            ("user-agent", "sdk/1"),
            ("accept-encoding", "gzip"),
            ("content-length", "10"),
            ("connection", "keep-alive"),
            ("x-uapk-override", "o"),
            ("host", "gw"),
        ]);
        let b = bound_headers(&h, &c);
        assert_eq!(b.keys().map(String::as_str).collect::<Vec<_>>(), ["idempotency-key", "stripe-account"]);
        assert_eq!(b["idempotency-key"], ["k1", "k2"]);
        // Non-UTF-8 values are bound by their bytes, not collapsed into one lossy string.
        let mut raw = HeaderMap::new();
        raw.insert("x-a", HeaderValue::from_bytes(b"\xff").unwrap());
        let mut raw2 = HeaderMap::new();
        raw2.insert("x-a", HeaderValue::from_bytes(b"\xfe").unwrap());
        assert_ne!(bound_headers(&raw, &c), bound_headers(&raw2, &c));
    }

    #[test]
    fn underscore_spellings_of_stripped_headers_are_stripped_too() {
        let agent = [
            ("x_api_key", "agent"),
            ("api_key", "agent"),
            ("X_Api-Key", "agent"),
            ("proxy_authorization", "agent"),
            ("authorization_", "kept: not a credential name"),
            ("x_custom_key", "agent"),
            ("x_hint", "agent"),
            ("x_other", "kept"),
        ];
        let mut h = headers(&agent);
        strip_for_connector(&mut h, &connector(&[("x-custom-key", "secret")], &["x-hint"]));
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization_", "x_other"]);
        // Without credentials an agent's own `x_api_key` is its business; strip_headers still apply.
        let mut h = headers(&agent);
        strip_for_connector(&mut h, &connector(&[], &["x-hint"]));
        assert!(h.contains_key("x_api_key") && h.contains_key("proxy_authorization") && !h.contains_key("x_hint"));
    }

    #[test]
    fn underscore_spellings_of_credentials_are_recorded_hashed() {
        let h = headers(&[("proxy_authorization", "Basic c2VjcmV0"), ("x_trace", "t")]);
        let rec = recorded_headers(&h, &[]);
        assert!(rec["proxy_authorization"].as_str().unwrap().starts_with("sha256:"), "{rec:?}");
        assert_eq!(rec["x_trace"], "t");
    }
}
