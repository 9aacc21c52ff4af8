//! End to end: params are what the upstream will act on. Each attack found on the old gateway is
//! sent exactly as it was, through a real gateway to a real upstream; the client must see the
//! refusal with its reason code, the upstream must see nothing, and the log must hold the record.

use crate::support::*;
use serde_json::{Value, json};

const FORM: &str = "application/x-www-form-urlencoded";

/// A Stripe-style payments agent: form-encoded refunds (as the real API), a JSON refund route,
/// an MCP-style refund tool call without a currency, a query search, a JSON ticket route and an
/// LLM route. Its only money rule is an approval threshold.
fn payments_manifest(upstream: std::net::SocketAddr) -> String {
    let head = manifest_head("pay-agent", "  required: true\n  max_lifetime: 24h\n");
    format!(
        r#"{head}connectors:
  - name: stripe
    base_url: http://{upstream}
    hosts: [127.0.0.1]
    ports: [{port}]
    routes:
      - methods: [POST]
        path: /v1/refunds
        action: payment.refund
        params:
          amount:       {{ form: amount, scale: 2 }}
          currency:     {{ form: currency }}
          counterparty: {{ form: customer }}
          order:        {{ form: "metadata[order_id]" }}
      - methods: [POST]
        path: /v1/json/refunds
        action: payment.refund
        params:
          amount:       {{ json: /amount, scale: 2 }}
          currency:     {{ json: /currency }}
          counterparty: {{ json: /customer }}
      - methods: [POST]
        path: /mcp/refund
        action: payment.refund
        params:
          amount: {{ json: /arguments/amount, scale: 2 }}
      - methods: [GET]
        path: /v1/customers/search
        action: customer.search
        params:
          counterparty: {{ query: customer }}
      - methods: [POST]
        path: /v1/tickets
        action: ticket.create
        params:
          counterparty: {{ json: /ticket/requester/email }}
      - methods: [POST]
        path: /v1/chat/completions
        action: llm.chat
        params:
          model: {{ json: /model }}
      - methods: [GET]
        path: /v1/charges/**
        action: payment.read
policy:
  approval:
    amount_above: {{ USD: "50.00" }}
  counterparties: {{ deny: [cus_blocked, ceo@acme.example] }}
  params:
    model: {{ allow: [gpt-4o-mini, gpt-4o] }}
"#,
        port = upstream.port()
    )
}

async fn start() -> (TestGateway, Upstream, String) {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&[("pay.yaml", payments_manifest(up.addr))], "").await;
    (gw, up, token("pay-agent"))
}

/// Sends a POST with `content_type` (none when empty) and `body`; returns (status, body).
async fn post(gw: &TestGateway, tok: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
    let mut rb = client().post(gw.base(path)).header("x-uapk-capability", tok).body(body.to_string());
    if !content_type.is_empty() {
        rb = rb.header("content-type", content_type);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Asserts a refusal the client can see, the record it names, and that the upstream saw nothing.
fn assert_refused(gw: &TestGateway, up: &Upstream, what: &str, got: &(u16, Value), status: u16, code: &str) -> Value {
    let (s, body) = got;
    assert_eq!(*s, status, "{what}: {body}");
    assert_eq!(body["reasons"][0]["code"], code, "{what}: {body}");
    assert_eq!(body["error"]["code"].as_str().unwrap_or(code), code, "{what}: {body}");
    assert_eq!(up.count(), 0, "{what}: the upstream must not see a refused request");
    let record = body["record"].as_u64().unwrap_or_else(|| panic!("{what}: no record in {body}"));
    let entry = gw.entry(record);
    assert_eq!(entry["kind"], "decision", "{what}");
    assert_eq!(entry["decision"], "deny", "{what}");
    assert_eq!(entry["reasons"][0]["code"], code, "{what}: {entry}");
    entry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_body_that_starts_with_a_json_object_is_read_as_the_form_it_is() {
    let (gw, up, tok) = start().await;
    // The body the old gateway recorded as 15.00 USD for cus_123 while the form-decoding
    // upstream acted on 99,999.00 for cus_blocked.
    let attack =
        r#"{"amount":1500,"currency":"usd","customer":"cus_123"}&amount=9999900&currency=usd&customer=cus_blocked"#;
    // Sent to a route that reads JSON: its media type is a form, so it is not read as JSON.
    let got = post(&gw, &tok, "/stripe/v1/json/refunds", FORM, attack).await;
    let e = assert_refused(&gw, &up, "form body to a JSON route", &got, 415, "unsupported_media_type");
    assert_eq!(e["params"], json!({}), "nothing was read from a body of the wrong media type: {e}");
    // Sent to the form route: the gateway reads what the upstream reads, and refuses it.
    let got = post(&gw, &tok, "/stripe/v1/refunds", FORM, attack).await;
    let e = assert_refused(&gw, &up, "form body to the form route", &got, 403, "counterparty_denied");
    assert_eq!(e["params"]["amount"], "99999", "{e}");
    assert_eq!(e["params"]["counterparty"], "cus_blocked", "{e}");
    // The same JSON sent without a Content-Type, or as text, is not guessed at either.
    let json_body = r#"{"amount":1500,"currency":"usd","customer":"cus_123"}"#;
    let got = post(&gw, &tok, "/stripe/v1/json/refunds", "", json_body).await;
    assert_refused(&gw, &up, "no content-type", &got, 415, "unsupported_media_type");
    let got = post(&gw, &tok, "/stripe/v1/json/refunds", "text/plain", json_body).await;
    assert_refused(&gw, &up, "text/plain", &got, 415, "unsupported_media_type");
    let got = post(&gw, &tok, "/stripe/v1/refunds", "application/json", json_body).await;
    assert_refused(&gw, &up, "JSON to the form route", &got, 415, "unsupported_media_type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_query_and_form_keys_are_ambiguous() {
    let (gw, up, tok) = start().await;
    for q in [
        "customer=a;customer=b",
        "customer=cus_1&customer=cus_blocked",
        "customer=cus_1;customer=cus_blocked",
        "x=1;customer=cus_blocked",
        "Customer=cus_blocked",
        "customer=cus+blocked",
    ] {
        let r = gw.get(&format!("/stripe/v1/customers/search?{q}"), &tok).await;
        let got = (r.status().as_u16(), r.json::<Value>().await.unwrap());
        let e = assert_refused(&gw, &up, q, &got, 403, "param_ambiguous");
        assert_eq!(e["query"], q, "the record keeps the query as sent");
    }
    for body in [
        "amount=1500&currency=usd&customer=cus_123;customer=cus_blocked",
        "amount=1500&currency=usd&customer=cus_123&customer=cus_blocked",
        "amount=1500&amount=9999900&currency=usd&customer=cus_123",
        "amount=1500&currency=usd&currency=jpy&customer=cus_123",
        "amount=1500&currency=usd&customer=cus_123&CUSTOMER=cus_blocked",
    ] {
        let got = post(&gw, &tok, "/stripe/v1/refunds", FORM, body).await;
        assert_refused(&gw, &up, body, &got, 403, "param_ambiguous");
    }
    // The same search with one value goes through.
    let r = gw.get("/stripe/v1/customers/search?customer=cus_1", &tok).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_lists_match_whatever_the_case() {
    let (gw, up, tok) = start().await;
    for who in ["CEO@acme.example", "Ceo@Acme.Example", " ceo@acme.example "] {
        let body = json!({"ticket": {"requester": {"email": who}, "subject": "refund"}}).to_string();
        let got = post(&gw, &tok, "/stripe/v1/tickets", "application/json", &body).await;
        let e = assert_refused(&gw, &up, who, &got, 403, "counterparty_denied");
        assert_eq!(e["params"]["counterparty"], who.trim(), "{e}");
    }
    let got = post(&gw, &tok, "/stripe/v1/refunds", FORM, "amount=100&currency=usd&customer=CUS_BLOCKED").await;
    assert_refused(&gw, &up, "CUS_BLOCKED", &got, 403, "counterparty_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_without_a_currency_fails_closed_against_a_threshold() {
    let (gw, up, tok) = start().await;
    // The MCP-style tool call has no currency at all: 99,999.00 of nothing.
    let call = json!({"name": "refund", "arguments": {"amount": 9999900, "customer": "cus_123"}}).to_string();
    let got = post(&gw, &tok, "/stripe/mcp/refund", "application/json", &call).await;
    let e = assert_refused(&gw, &up, "tool call", &got, 403, "currency_required");
    assert_eq!(e["params"]["amount"], "99999", "{e}");
    for (what, body, code) in [
        ("no currency", "amount=9999900&customer=cus_123", "currency_required"),
        ("empty currency", "amount=9999900&currency=&customer=cus_123", "currency_required"),
        ("not a code", "amount=9999900&currency=dollars&customer=cus_123", "currency_required"),
        ("unknown currency", "amount=9999900&currency=eur&customer=cus_123", "currency_not_allowed"),
    ] {
        let got = post(&gw, &tok, "/stripe/v1/refunds", FORM, body).await;
        assert_refused(&gw, &up, what, &got, 403, code);
    }
    let body = json!({"amount": 9999900, "currency": null, "customer": "cus_123"}).to_string();
    let got = post(&gw, &tok, "/stripe/v1/json/refunds", "application/json", &body).await;
    assert_refused(&gw, &up, "null currency", &got, 403, "currency_required");
    // With the currency the threshold names, the same refund escalates instead.
    let r = client()
        .post(gw.base("/stripe/v1/refunds"))
        .header("x-uapk-capability", &tok)
        .form(&[("amount", "9999900"), ("currency", "usd"), ("customer", "cus_123")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["decision"].as_str(), v["reasons"][0]["code"].as_str()),
        (Some("escalate"), Some("amount_requires_approval"))
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameters_are_malformed_requests() {
    let (gw, up, tok) = start().await;
    for path in [
        "/stripe/v1/charges/..;/refunds",
        "/stripe/v1/charges/ch_1;jsessionid=abc",
        "/stripe/v1/charges/ch_1%3bjsessionid=abc",
        "/stripe/v1/charges/ch_1%3B/x",
        "/stripe/v1/charges;/ch_1",
    ] {
        let resp = raw(
            &gw,
            format!("GET {path} HTTP/1.1\r\nHost: gw\r\nx-uapk-capability: {tok}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        // (Sent raw: clients normalise paths before sending.)
        let e = assert_refused(&gw, &up, path, &(status_of(&resp), body_json(&resp)), 400, "malformed_request");
        assert_eq!(e["path"], path, "the record keeps the path as sent");
    }
    // The plain path still works.
    let r = gw.get("/stripe/v1/charges/ch_1", &tok).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().path, "/v1/charges/ch_1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_json_keys_are_ambiguous() {
    let (gw, up, tok) = start().await;
    for body in [
        r#"{"amount":1500,"currency":"usd","customer":"cus_123","customer":"cus_blocked"}"#,
        r#"{"amount":1500,"amount":9999900,"currency":"usd","customer":"cus_123"}"#,
        r#"{"amount":1500,"currency":"usd","customer":"cus_123","Customer":"cus_blocked"}"#,
        r#"{"amount":1500,"currency":"usd","customer":"cus_123","\u0063ustomer":"cus_blocked"}"#,
    ] {
        let got = post(&gw, &tok, "/stripe/v1/json/refunds", "application/json", body).await;
        assert_refused(&gw, &up, body, &got, 403, "param_ambiguous");
    }
    let nested = r#"{"ticket":{"requester":{"email":"a@b.example"},"requester":{"email":"ceo@acme.example"}}}"#;
    let got = post(&gw, &tok, "/stripe/v1/tickets", "application/json", nested).await;
    assert_refused(&gw, &up, "nested", &got, 403, "param_ambiguous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_form_refund_records_what_the_upstream_got() {
    let (gw, up, tok) = start().await;
    let r = client()
        .post(gw.base("/stripe/v1/refunds"))
        .header("x-uapk-capability", &tok)
        .form(&[("amount", "1500"), ("currency", "usd"), ("customer", "cus_123"), ("metadata[order_id]", "ord 42")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let record = record_of(&r);
    let seen = up.last();
    assert_eq!(up.count(), 1);
    assert_eq!(seen.headers["content-type"], FORM);
    let got: std::collections::BTreeMap<String, String> =
        url::form_urlencoded::parse(&seen.body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let entry = gw.entry(record);
    assert_eq!(entry["decision"], "allow");
    let params = &entry["params"];
    let minor: rust_decimal::Decimal = got["amount"].parse().unwrap();
    let recorded: rust_decimal::Decimal = params["amount"].as_str().unwrap().parse().unwrap();
    assert_eq!(recorded * rust_decimal::Decimal::from(100), minor, "{entry}");
    assert_eq!(params["currency"], got["currency"].to_ascii_uppercase());
    assert_eq!(params["counterparty"], got["customer"].as_str());
    assert_eq!(params["order"], got["metadata[order_id]"].as_str());
    assert_eq!(entry["body_sha256"], sha256_hex(&seen.body), "the record hashes the bytes forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_allowlists_in_the_manifest_and_the_token() {
    let (gw, up, tok) = start().await;
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let got = post(&gw, &tok, "/stripe/v1/chat/completions", "application/json", &chat("o1-pro")).await;
    assert_refused(&gw, &up, "o1-pro", &got, 403, "param_not_allowed");
    let got = post(&gw, &tok, "/stripe/v1/chat/completions", "application/json", r#"{"messages":[]}"#).await;
    assert_refused(&gw, &up, "no model", &got, 403, "param_not_allowed");
    // A token minted with the CLI flag narrows the manifest's list to one model.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("issuer.pem");
    {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let pem = issuer_key().to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF).unwrap();
        std::fs::write(&key, pem.as_bytes()).unwrap();
    }
    let (code, out, err) = run_cli(
        &[
            "token",
            "mint",
            "--issuer-key",
            key.to_str().unwrap(),
            "--iss",
            "platform",
            "--sub",
            "pay-agent",
            "--param-allow",
            "model=GPT-4o-mini",
            "--param-max",
            "amount=20",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let narrow = out.trim().to_string();
    let got = post(&gw, &narrow, "/stripe/v1/chat/completions", "application/json", &chat("gpt-4o")).await;
    assert_refused(&gw, &up, "token model", &got, 403, "token_param_not_allowed");
    let got = post(&gw, &narrow, "/stripe/v1/refunds", FORM, "amount=2001&currency=usd&customer=cus_1").await;
    assert_refused(&gw, &up, "token amount", &got, 403, "token_param_out_of_range");
    // A token whose param constraint the gateway cannot read is invalid, not unconstrained.
    let base = serde_json::to_value(claims("pay-agent")).unwrap();
    for bad in
        [json!({"model": {"alow": ["o1-pro"]}}), json!({"amount": {"max": "lots"}}), json!({"amount": {"max": 20}})]
    {
        let mut c = base.clone();
        c["constraints"] = json!({ "params": bad });
        let t = sign_jws(&issuer_key(), r#"{"typ":"JWT","alg":"EdDSA"}"#, &c.to_string());
        let got = post(&gw, &t, "/stripe/v1/chat/completions", "application/json", &chat("gpt-4o")).await;
        assert_refused(&gw, &up, &c["constraints"].to_string(), &got, 403, "capability_token_invalid");
    }
    // The models each list allows go through.
    let (s, _) = post(&gw, &narrow, "/stripe/v1/chat/completions", "application/json", &chat("gpt-4o-mini")).await;
    assert_eq!(s, 200);
    let (s, _) = post(&gw, &tok, "/stripe/v1/chat/completions", "application/json", &chat("gpt-4o")).await;
    assert_eq!(s, 200);
    assert_eq!(up.count(), 2);
    // A malformed flag is a usage error, not a token without the constraint.
    let (code, _, err) = run_cli(
        &[
            "token",
            "mint",
            "--issuer-key",
            key.to_str().unwrap(),
            "--iss",
            "p",
            "--sub",
            "a",
            "--param-min",
            "amount=x",
        ],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
}

/// GETs the customer search with `query` as sent; returns (status, body).
async fn search(gw: &TestGateway, tok: &str, query: &str) -> (u16, Value) {
    let r = gw.get(&format!("/stripe/v1/customers/search?{query}"), tok).await;
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// SPEC §16.4: bracket-aware upstreams (PHP, Rails, `qs`) read `customer[]`, `customer[0]` and
/// `customer[x]` as `customer`: sent beside (or instead of) a read form or query key, the param
/// has two readings. JSON keys have no such reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_param_also_sent_with_brackets_is_ambiguous() {
    let (gw, up, tok) = start().await;
    for extra in [
        "customer[]=cus_blocked",
        "customer[0]=cus_blocked",
        "customer[x]=cus_blocked",
        "customer%5B%5D=cus_blocked",
        "Customer[]=cus_blocked",
    ] {
        for sep in ['&', ';'] {
            let body = format!("amount=100&currency=usd&customer=cus_ok{sep}{extra}");
            let got = post(&gw, &tok, "/stripe/v1/refunds", FORM, &body).await;
            let e = assert_refused(&gw, &up, &body, &got, 403, "param_ambiguous");
            assert!(e["reasons"][0]["message"].as_str().unwrap().contains("customer"), "{e}");
            let query = format!("customer=cus_ok{sep}{extra}");
            let got = search(&gw, &tok, &query).await;
            let e = assert_refused(&gw, &up, &query, &got, 403, "param_ambiguous");
            assert_eq!(e["query"], query.as_str(), "the record keeps the query as sent");
        }
    }
    // Only the bracketed spelling: the upstream reads cus_blocked where the policy read nothing.
    let got = post(&gw, &tok, "/stripe/v1/refunds", FORM, "amount=100&currency=usd&customer[]=cus_blocked").await;
    assert_refused(&gw, &up, "only customer[]", &got, 403, "param_ambiguous");
    let got = search(&gw, &tok, "customer[0]=cus_blocked").await;
    assert_refused(&gw, &up, "only customer[0]", &got, 403, "param_ambiguous");
    // A read key that has brackets of its own (`metadata[order_id]`) is read as sent, and a
    // deeper spelling of it is ambiguous as well.
    let body = "amount=100&currency=usd&customer=cus_ok&metadata[order_id]=o1&metadata[order_id][]=o2";
    let got = post(&gw, &tok, "/stripe/v1/refunds", FORM, body).await;
    assert_refused(&gw, &up, body, &got, 403, "param_ambiguous");
    // Other keys that merely start alike pass, as does a JSON body with a `customer[]` key
    // (JSON upstreams read keys as they are).
    let (s, v) = post(
        &gw,
        &tok,
        "/stripe/v1/refunds",
        FORM,
        "amount=100&currency=usd&customer=cus_ok&customers[]=x&metadata[order_id]=o1",
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = search(&gw, &tok, "customer=cus_ok&customer_id[]=x").await;
    assert_eq!(s, 200);
    let json_body = json!({"amount": 100, "currency": "usd", "customer": "cus_ok", "customer[]": "cus_blocked"});
    let (s, _) = post(&gw, &tok, "/stripe/v1/json/refunds", "application/json", &json_body.to_string()).await;
    assert_eq!(s, 200);
    assert_eq!(up.count(), 3);
}

/// SPEC §16.4: a value compared with a list that holds a control character or an invisible
/// format character is `param_invalid`: `"cus_blocked\u0000"` is `cus_blocked` to a C-string
/// upstream, `"cus_\u200bblocked"` to one that drops format characters. From every source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_and_control_characters_in_listed_values_are_invalid() {
    let (gw, up, tok) = start().await;
    let refund = |c: &str| json!({"amount": 100, "currency": "usd", "customer": c}).to_string();
    for c in [
        "cus_blocked\u{0}",
        "cus_\u{200b}blocked",
        "\u{feff}cus_blocked",
        "cus_blocked\u{2060}",
        "cus_bl\u{ad}ocked",
        "cus_blocked\u{200e}",
        "\u{202e}dekcolb_suc",
        "cus_blocked\u{2066}",
        "cus_blocked\u{1b}",
        "cus_blocked\u{85}",
        "cus_blocked\u{a0}",
    ] {
        let got = post(&gw, &tok, "/stripe/v1/json/refunds", "application/json", &refund(c)).await;
        let e = assert_refused(&gw, &up, &format!("{c:?}"), &got, 403, "param_invalid");
        assert_eq!(e["params"]["counterparty"], c, "the record keeps the value as read: {e}");
    }
    // Nested JSON (a ticket's requester), a form body, a query, and a `policy.params` list.
    let ticket = json!({"ticket": {"requester": {"email": "ceo@acme.example\u{200b}"}}}).to_string();
    let got = post(&gw, &tok, "/stripe/v1/tickets", "application/json", &ticket).await;
    assert_refused(&gw, &up, "ticket", &got, 403, "param_invalid");
    for body in
        ["amount=100&currency=usd&customer=cus_blocked%00", "amount=100&currency=usd&customer=cus_%E2%80%8Bblocked"]
    {
        let got = post(&gw, &tok, "/stripe/v1/refunds", FORM, body).await;
        assert_refused(&gw, &up, body, &got, 403, "param_invalid");
    }
    for q in ["customer=cus_blocked%00", "customer=cus_%EF%BB%BFblocked", "customer=cus_blocked%C2%A0"] {
        let got = search(&gw, &tok, q).await;
        assert_refused(&gw, &up, q, &got, 403, "param_invalid");
    }
    let chat = json!({"model": "gpt-4o\u{2063}", "messages": []}).to_string();
    let got = post(&gw, &tok, "/stripe/v1/chat/completions", "application/json", &chat).await;
    assert_refused(&gw, &up, "model", &got, 403, "param_invalid");
    // Plain values pass; so does a param no list reads (`order`), whatever it holds.
    let (s, v) = post(&gw, &tok, "/stripe/v1/json/refunds", "application/json", &refund("cus_ok")).await;
    assert_eq!(s, 200, "{v}");
    let body = "amount=100&currency=usd&customer=cus_ok&metadata[order_id]=o%E2%80%8B1";
    let (s, v) = post(&gw, &tok, "/stripe/v1/refunds", FORM, body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(up.count(), 2);
}

/// SPEC §16.4: CGI-style servers (PHP, WSGI, Rack) read `x_api_key` as `X-Api-Key`. On a
/// connector that injects a credential, any header that reads as a credential header or as the
/// injected one, with `_` for `-`, is stripped: the upstream receives the injected credential
/// only. A connector without credentials leaves the agent's headers alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_of_credential_headers_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let connectors = format!(
        r#"connectors:
  - name: keyed
    base_url: http://{addr}
    hosts: [keyed.test]
    credentials:
      - header: x-api-key
        value: "sk_injected_${{file:secret}}"
      - header: x-org-token
        value: "org_injected"
    strip_headers: [x-session-hint]
    routes:
      - path: /**
        action: keyed.any
"#,
        addr = up.addr
    );
    let m = manifest("pay-agent", up.addr, "", "").replacen("connectors:\n", &connectors, 1);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/secret"), "s3cr3t\n").unwrap();
    let gw = TestGateway::start_in(dir, &[("pay.yaml", m)], "").await;
    let tok = token("pay-agent");
    let agent_headers = [
        ("x_api_key", "agent-key"),
        ("api_key", "agent-key"),
        ("x_api-key", "agent-key"),
        ("x-api_key", "agent-key"),
        ("X_API_KEY", "agent-key"),
        ("authorization", "Bearer agent"),
        ("proxy_authorization", "Basic agent"),
        ("cookie", "session=agent"),
        ("x_org_token", "agent-org"),
        ("x_session_hint", "agent"),
        ("x_request_tag", "kept"),
    ];
    let mut rb = client().get(gw.base("/keyed/v1/items")).header("x-uapk-capability", &tok);
    for (k, v) in agent_headers {
        rb = rb.header(k, v);
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let record = record_of(&r);
    let seen = up.last();
    let creds: Vec<(String, String)> = seen
        .headers
        .iter()
        .filter(|(k, _)| k.as_str() != "x-request-tag" && k.as_str() != "x_request_tag")
        .filter(|(_, v)| v.to_str().is_ok_and(|v| v.contains("agent") || v.contains("injected")))
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        creds,
        [
            ("x-api-key".to_string(), "sk_injected_s3cr3t".to_string()),
            ("x-org-token".to_string(), "org_injected".to_string())
        ],
        "what the upstream received: {:?}",
        seen.headers
    );
    assert_eq!(seen.headers["x_request_tag"], "kept", "other underscore headers pass");
    // The record shows what the agent sent, its credentials hashed, never the injected secret.
    let e = gw.entry(record);
    assert!(e["headers"]["proxy_authorization"].as_str().unwrap().starts_with("sha256:"), "{e}");
    assert!(!e.to_string().contains("s3cr3t"));
    // Without credentials (`shop`), the agent's headers are its own business.
    let mut rb = client().get(gw.base("/shop/v1/charges/ch_1")).header("x-uapk-capability", &tok);
    for (k, v) in agent_headers {
        rb = rb.header(k, v);
    }
    assert_eq!(rb.send().await.unwrap().status(), 200);
    let seen = up.last();
    assert_eq!(seen.headers["x_api_key"], "agent-key");
    assert_eq!(seen.headers["authorization"], "Bearer agent");
}
