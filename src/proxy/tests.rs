use super::hygiene::{bound_headers, strip_for_connector, strip_request, upgrade_refusal};
use crate::config::{Connector, TlsMode};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

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
    let rec = super::hygiene::recorded_headers(&h, &[]);
    assert!(rec["proxy_authorization"].as_str().unwrap().starts_with("sha256:"), "{rec:?}");
    assert_eq!(rec["x_trace"], "t");
}

/// The access line carries the caller's trace id (a valid `traceparent`), and none without one.
#[test]
fn access_line_carries_the_trace_id_when_one_is_known() {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let line = |traceparent: Option<&str>| -> serde_json::Value {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber =
            tracing_subscriber::fmt().json().flatten_event(true).with_writer(move || writer.clone()).finish();
        let mut h = HeaderMap::new();
        if let Some(t) = traceparent {
            h.insert("traceparent", HeaderValue::from_str(t).unwrap());
        }
        let access = super::body::Access {
            request_id: "r1".into(),
            agent: "a".into(),
            connector: "c".into(),
            action: "x.read".into(),
            decision: "allow",
            reasons: "all_checks_passed".into(),
            started: crate::clock::instant(),
            trace: crate::telemetry::Telemetry::off().start_request(&h, "GET"),
        };
        tracing::subscriber::with_default(subscriber, || {
            super::body::access_line(&access, http::StatusCode::OK, 5, Some(7), None, None)
        });
        let out = buf.0.lock().unwrap().clone();
        serde_json::from_slice(&out).unwrap()
    };
    let l = line(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    assert_eq!(l["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{l}");
    assert_eq!((l["request_id"].as_str(), l["record"].as_u64()), (Some("r1"), Some(7)), "{l}");
    let l = line(None);
    assert!(l.get("trace_id").is_none() && l["request_id"] == "r1", "{l}");
}
