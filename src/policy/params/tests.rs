//! The readers, one source at a time: media types, JSON with duplicate keys, form and query
//! pairs, headers, path captures and fixed values.

use super::*;
use crate::config::{ParamSpec, PathPattern};
use http::{HeaderName, HeaderValue};

fn route(specs: &[(&str, ParamSource)]) -> Route {
    Route {
        methods: vec![],
        path: PathPattern::parse("/x").unwrap(),
        action: "test.action".into(),
        params: specs
            .iter()
            .map(|(n, s)| ParamSpec {
                name: n.to_string(),
                source: s.clone(),
                scale: if *n == "amount" { Some(2) } else { None },
            })
            .collect(),
        safe: false,
    }
}

fn json(ptr: &str) -> ParamSource {
    ParamSource::Json(ptr.into())
}
fn form(key: &str) -> ParamSource {
    ParamSource::Form(key.into())
}
fn query(key: &str) -> ParamSource {
    ParamSource::Query(key.into())
}

fn headers(list: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in list {
        h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    h
}

fn media(route: &Route, hs: &[(&str, &str)], body: &str) -> Result<(), (&'static str, String)> {
    check_body_media_type(route, &headers(hs), body.as_bytes())
        .map_err(|d| (d.code().as_str(), d.reasons[0].message.clone()))
}

fn from_body(route: &Route, body: &str) -> Params {
    extract_params(route, &[], &HeaderMap::new(), None, Some(body.as_bytes()))
}

fn from_query(route: &Route, q: &str) -> Params {
    extract_params(route, &[], &HeaderMap::new(), Some(q), None)
}

#[test]
fn json_routes_read_only_json_media_types() {
    let r = route(&[("customer", json("/customer"))]);
    let body = r#"{"customer":"c"}"#;
    for ct in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;Charset=\"UTF-8\"",
        "application/merge-patch+json",
        "application/vnd.api+json",
    ] {
        assert_eq!(media(&r, &[("content-type", ct)], body), Ok(()), "{ct}");
    }
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=iso-8859-1",
        "application/json; charset=utf-8; charset=utf-8",
        "application/jsonx",
        "json",
        "application/json; garbage",
    ] {
        let got = media(&r, &[("content-type", ct)], body);
        assert_eq!(got.as_ref().map_err(|e| e.0), Err("unsupported_media_type"), "{ct}: {got:?}");
    }
    // A non-empty body with no Content-Type is not guessed to be JSON.
    assert_eq!(media(&r, &[], body).unwrap_err().0, "unsupported_media_type");
    // No body at all: nothing to misread (the params are simply missing).
    assert_eq!(media(&r, &[], ""), Ok(()));
    // An encoded body would be read as garbage here and decoded upstream.
    let got = media(&r, &[("content-type", "application/json"), ("content-encoding", "gzip")], body);
    assert_eq!(got.unwrap_err().0, "unsupported_media_type");
    assert_eq!(media(&r, &[("content-type", "application/json"), ("content-encoding", "identity")], body), Ok(()));
    // Two Content-Types are two readings.
    let got = media(&r, &[("content-type", "application/json"), ("content-type", "text/plain")], body);
    assert_eq!(got.unwrap_err().0, "param_ambiguous");
}

#[test]
fn form_routes_read_only_form_bodies_and_other_routes_any() {
    let r = route(&[("amount", form("amount"))]);
    assert_eq!(media(&r, &[("content-type", "application/x-www-form-urlencoded")], "amount=1"), Ok(()));
    assert_eq!(media(&r, &[("content-type", "application/x-www-form-urlencoded;charset=UTF-8")], "amount=1"), Ok(()));
    let got = media(&r, &[("content-type", "application/json")], r#"{"amount":1}"#);
    assert_eq!(got.unwrap_err().0, "unsupported_media_type");
    // A route that reads no body params does not care what the body is.
    let r = route(&[("customer", query("customer"))]);
    assert_eq!(media(&r, &[("content-type", "text/plain")], "hello"), Ok(()));
}

#[test]
fn form_keys_are_read_as_sent_and_plus_is_a_space() {
    let r = route(&[
        ("amount", form("amount")),
        ("currency", form("currency")),
        ("order", form("metadata[order_id]")),
        ("note", form("note")),
    ]);
    let p = from_body(&r, "amount=1500&currency=usd&metadata%5Border_id%5D=ord+42&note=%20a+b%2Bc%20");
    assert_eq!(p.ambiguous, None);
    assert_eq!(p.amount, Some("15".parse().unwrap()));
    assert_eq!(p.get("currency"), Some("USD"));
    assert_eq!(p.get("order"), Some("ord 42"));
    assert_eq!(p.get("note"), Some("a b+c"), "trimmed of ASCII whitespace");
    // A form body that starts with a JSON object is still a form: its first key is that text.
    let p = from_body(&r, r#"{"amount":1500,"currency":"usd"}&amount=9999900&currency=usd"#);
    assert_eq!(p.ambiguous, None);
    assert_eq!(p.amount, Some("99999".parse().unwrap()));
    // An empty value is a missing one.
    let p = from_body(&r, "amount=1&currency=+&note=");
    assert_eq!((p.get("currency"), p.get("note")), (None, None));
}

#[test]
fn repeated_form_and_query_keys_are_ambiguous() {
    let r = route(&[("customer", form("customer"))]);
    for body in [
        "customer=a&customer=b",
        "customer=a&customer=a",
        "customer=a;customer=b",
        "x=1;customer=b",
        "customer=a;b",
        "customer=a&Customer=b",
        "Customer=b",
        "CUSTOMER=b",
        "cu%73tomer=a&customer=b",
    ] {
        let p = from_body(&r, body);
        assert!(p.ambiguous.is_some(), "{body}: {p:?}");
        assert_eq!(p.get("customer"), None, "{body}");
    }
    // Keys percent-decode once, as the upstream decodes them.
    assert_eq!(from_body(&r, "cu%73tomer=a").get("customer"), Some("a"));
    assert_eq!(from_body(&r, "other=1&customer=a&x=").get("customer"), Some("a"));

    let r = route(&[("customer", query("customer"))]);
    for q in ["customer=a&customer=b", "customer=a;customer=b", "x=1;customer=b", "Customer=a", "customer=a+b"] {
        let p = from_query(&r, q);
        assert!(p.ambiguous.is_some(), "{q}: {p:?}");
    }
    assert_eq!(from_query(&r, "customer=a%20b").get("customer"), Some("a b"));
    assert_eq!(from_query(&r, "customer=a%2Bb").get("customer"), Some("a+b"));
    // A '+' in a param nobody reads does not matter.
    let p = from_query(&r, "q=a+b&customer=c");
    assert_eq!((p.ambiguous.as_deref(), p.get("customer")), (None, Some("c")));
}

#[test]
fn duplicate_json_keys_on_the_path_are_ambiguous() {
    let r = route(&[("customer", json("/data/customer")), ("currency", json("/currency"))]);
    for body in [
        r#"{"data":{"customer":"a","customer":"b"},"currency":"usd"}"#,
        r#"{"data":{"customer":"a"},"data":{"customer":"b"},"currency":"usd"}"#,
        r#"{"data":{"customer":"a"},"currency":"usd","currency":"eur"}"#,
        r#"{"data":{"customer":"a","Customer":"b"},"currency":"usd"}"#,
        r#"{"data":{"cuſtomer":"b"},"currency":"usd"}"#,
        r#"{"data":{"customer":"a","\u0063ustomer":"b"},"currency":"usd"}"#,
        r#"{"DATA":{"customer":"a"},"currency":"usd"}"#,
    ] {
        let p = from_body(&r, body);
        assert!(p.ambiguous.is_some(), "{body}: {p:?}");
    }
    // Duplicates off the path are not this param's business.
    let p = from_body(&r, r#"{"data":{"customer":"a","x":1,"x":2},"meta":1,"meta":2,"currency":"usd"}"#);
    assert_eq!(p.ambiguous, None);
    assert_eq!((p.get("customer"), p.get("currency")), (Some("a"), Some("USD")));
}

#[test]
fn json_pointers_follow_rfc_6901() {
    let r =
        route(&[("a", json("/a~1b")), ("t", json("/m~0n")), ("i", json("/items/1/id")), ("z", json("/items/01/id"))]);
    let p = from_body(&r, r#"{"a/b":"slash","m~n":"tilde","items":[{"id":"x"},{"id":"y"}]}"#);
    assert_eq!(p.ambiguous, None);
    assert_eq!((p.get("a"), p.get("t"), p.get("i"), p.get("z")), (Some("slash"), Some("tilde"), Some("y"), None));
}

#[test]
fn amounts_from_every_source_fail_closed_when_ambiguous_or_unreadable() {
    let r = route(&[("amount", json("/amount"))]);
    let p = from_body(&r, r#"{"amount":100,"amount":9999900}"#);
    assert!(p.ambiguous.is_some() && p.amount.is_none());
    let p = from_body(&r, "not json");
    assert!(p.amount_error.is_some());
    let r = route(&[("amount", form("amount"))]);
    assert!(from_body(&r, "amount=100&amount=9999900").ambiguous.is_some());
    assert!(from_body(&r, "amount=1e3").amount_error.is_some());
    assert!(from_body(&r, "amount=").amount_error.is_some());
}

#[test]
fn headers_path_captures_and_fixed_values() {
    let r = route(&[
        ("jurisdiction", ParamSource::Header(HeaderName::from_static("x-country"))),
        ("counterparty", ParamSource::Path("to".into())),
        ("currency", ParamSource::Value("usd".into())),
    ]);
    let caps = vec![("to".to_string(), "cus%5Fb".to_string())];
    let p = extract_params(&r, &caps, &headers(&[("x-country", " us ")]), None, None);
    assert_eq!(p.ambiguous, None);
    assert_eq!(p.get("jurisdiction"), Some("us"));
    assert_eq!(p.get("counterparty"), Some("cus_b"));
    assert_eq!((p.get("currency"), p.currency.as_deref()), (Some("USD"), Some("USD")));
    for hs in [vec![("x-country", "US"), ("x-country", "FR")], vec![("x-country", "US, FR")]] {
        let p = extract_params(&r, &caps, &headers(&hs), None, None);
        assert!(p.ambiguous.as_deref().is_some_and(|m| m.contains("x-country")), "{hs:?}: {p:?}");
    }
}

#[test]
fn decimal_values_for_ranges() {
    assert_eq!(parse_decimal_value(" 0.50 "), Some("0.50".parse().unwrap()));
    assert_eq!(parse_decimal_value("-2"), Some("-2".parse().unwrap()));
    for bad in ["", "-", "1e3", "0x10", "1.", ".5", "1.2.3", "NaN", "+1", "1 000"] {
        assert_eq!(parse_decimal_value(bad), None, "{bad}");
    }
}

#[test]
fn bracketed_spellings_of_a_read_key_are_ambiguous() {
    let r = route(&[("customer", form("customer")), ("order", form("metadata[order_id]"))]);
    for body in [
        "customer=cus_ok&customer[]=cus_blocked",
        "customer[]=cus_blocked&customer=cus_ok",
        "customer=cus_ok&customer[0]=cus_blocked",
        "customer=cus_ok&customer[x]=cus_blocked",
        "customer=cus_ok;customer[]=cus_blocked",
        "customer=cus_ok&customer%5B%5D=cus_blocked",
        "customer=cus_ok&Customer[]=cus_blocked",
        "customer=cus_ok&customer[a][b]=cus_blocked",
        "customer[]=cus_blocked",
        "customer=cus_ok&metadata[order_id][]=o2&metadata[order_id]=o1",
    ] {
        let p = from_body(&r, body);
        assert!(p.ambiguous.as_deref().is_some_and(|m| m.contains("sent as")), "{body}: {p:?}");
    }
    // Keys that merely start alike, or a bracket that never closes, are other keys.
    for body in ["customer=cus_ok&customers[]=x", "customer=cus_ok&customer[=x", "customer=cus_ok&xcustomer[]=y"] {
        let p = from_body(&r, body);
        assert_eq!((p.ambiguous.as_deref(), p.get("customer")), (None, Some("cus_ok")), "{body}");
    }
    assert_eq!(from_body(&r, "metadata[order_id]=o1&customer=c").get("order"), Some("o1"));

    let r = route(&[("customer", query("customer"))]);
    for q in ["customer=cus_ok&customer[]=cus_blocked", "customer[0]=cus_blocked", "customer=a&customer%5b0%5d=b"] {
        let p = from_query(&r, q);
        assert!(p.ambiguous.is_some(), "{q}: {p:?}");
    }
}

#[test]
fn control_format_and_unicode_space_characters_are_found() {
    for v in [
        "cus_blocked\u{0}",
        "cus_\u{1}x",
        "cus\u{7f}",
        "cus\u{85}",
        "cus\u{9f}",
        "cus_\u{200b}blocked",
        "\u{feff}cus_blocked",
        "cus\u{ad}blocked",
        "cus\u{200e}",
        "cus\u{200f}",
        "cus\u{202a}",
        "cus\u{202e}",
        "cus\u{2060}",
        "cus\u{2066}",
        "cus\u{2069}",
        "cus\u{61c}",
        "cus\u{180e}",
        "cus\u{fe0f}",
        "cus\u{e0041}",
        "cus\u{1343f}",
        "cus_blocked\u{a0}",
        "cus\u{3000}",
        "cus\u{2028}",
    ] {
        assert!(invalid_char(v).is_some(), "{v:?}");
    }
    for v in ["cus_blocked", "ceo@acme.example", "Zoë Ltd", "株式会社", "gpt-4o-mini", "a b", "😀", "\u{2c7}"] {
        assert_eq!(invalid_char(v), None, "{v:?}");
    }
    // The table is sorted and its ranges do not overlap (binary search relies on it).
    assert!(INVISIBLE.windows(2).all(|w| w[0].1 < w[1].0) && INVISIBLE.iter().all(|(lo, hi)| lo <= hi));
}
