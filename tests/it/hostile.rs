//! Hostile input: every case gets its documented status (never a crash or a hang), a decision
//! record where a request was identified, and after every case the gateway still serves a normal
//! request.

use crate::support::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upstreams that misbehave on purpose: `/close` closes mid-response, `/huge` streams 100 MB,
/// `/hang` never answers; anything else answers 200.
async fn nasty_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                if path.contains("/close") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial").await;
                } else if path.contains("/huge") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 104857600\r\n\r\n").await;
                    let chunk = vec![b'x'; 1 << 20];
                    for _ in 0..100 {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                } else if path.contains("/switch-h2c") {
                    // An upstream that switches to a protocol nobody may speak through the gateway.
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\nRAW-UPSTREAM")
                        .await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                } else if path.contains("/hang") {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                } else {
                    let seen = head.to_ascii_lowercase();
                    let body = format!(
                        "{{\"ok\":true,\"auth\":{},\"foo\":{}}}",
                        seen.contains("\r\nauthorization:"),
                        seen.contains("\r\nx-uapk-foo:")
                    );
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                }
            });
        }
    });
    addr
}

const LIMITS: &str = "limits:\n  max_header_bytes: 4096\n  max_body_bytes: 1024\n  header_read_timeout: 1s\n  body_read_timeout: 1s\n  upstream_timeout: 1s\n";

async fn start() -> (TestGateway, SocketAddr) {
    let up = nasty_upstream().await;
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up, POLICY, ""))], LIMITS).await;
    (gw, up)
}

/// The record index a raw refusal's JSON body names.
fn record_of(resp: &str) -> Option<u64> {
    body_json(resp)["record"].as_u64()
}

async fn alive(gw: &TestGateway, tok: &str) {
    let r = gw.get("/shop/v1/charges/ok", tok).await;
    assert_eq!(r.status(), 200, "the gateway stopped serving normal requests");
}

fn req(line: &str, tok: &str, extra: &str, body: &str) -> Vec<u8> {
    format!("{line}\r\nHost: gw\r\nx-uapk-capability: {tok}\r\nConnection: close\r\n{extra}\r\n{body}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_smuggling_requests() {
    let (gw, _) = start().await;
    let tok = token("pay-agent");
    let refund = r#"{"amount":100,"currency":"USD","customer":"c"}"#;
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        // hyper frames by Transfer-Encoding and drops Content-Length (RFC 9112 §6.3); the gateway
        // re-frames what it forwards, so nothing is smuggled downstream either way.
        (
            "CL+TE",
            req(
                "POST /shop/v1/refunds HTTP/1.1",
                &tok,
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\nx-country: US\r\n",
                    refund.len()
                ),
                &format!("{:x}\r\n{refund}\r\n0\r\n\r\n", refund.len()),
            ),
            &[400, 200],
        ),
        (
            "duplicate differing CL",
            req("POST /shop/v1/refunds HTTP/1.1", &tok, "Content-Length: 5\r\nContent-Length: 7\r\n", "hello12"),
            &[400],
        ),
        (
            "garbage chunk size",
            req("POST /shop/v1/refunds HTTP/1.1", &tok, "Transfer-Encoding: chunked\r\n", "zz\r\nhello\r\n0\r\n\r\n"),
            &[400, 403],
        ),
        (
            "TE chunked, identity",
            req(
                "POST /shop/v1/refunds HTTP/1.1",
                &tok,
                "Transfer-Encoding: chunked, identity\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            &[400, 501],
        ),
        ("obs-fold header", req("GET /shop/v1/charges/a HTTP/1.1", &tok, "X-Folded: a\r\n  b\r\n", ""), &[400]),
        (
            "oversized header",
            req("GET /shop/v1/charges/a HTTP/1.1", &tok, &format!("X-Big: {}\r\n", "a".repeat(8000)), ""),
            &[431, 400],
        ),
        (
            "too many headers",
            req(
                "GET /shop/v1/charges/a HTTP/1.1",
                &tok,
                &(0..200).map(|i| format!("X-H{i}: v\r\n")).collect::<String>(),
                "",
            ),
            &[431, 400],
        ),
        ("malformed request line", b"GARBAGE\r\n\r\n".to_vec(), &[400]),
        ("invalid header name", req("GET /shop/v1/charges/a HTTP/1.1", &tok, "Bad Header: x\r\n", ""), &[400]),
        ("CR in header value", req("GET /shop/v1/charges/a HTTP/1.1", &tok, "X-A: a\rb\r\n", ""), &[400]),
        (
            "invalid UTF-8 in path",
            [b"GET /shop/v1/charges/\xff\xfe HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".as_slice()].concat(),
            &[400],
        ),
        (
            "very long path",
            req(&format!("GET /shop/v1/charges/{} HTTP/1.1", "a".repeat(9000)), &tok, "", ""),
            &[414, 431, 400],
        ),
        (
            "HTTP/2 preface then junk",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12junk-frame-bytes".to_vec(),
            &[0, 400],
        ),
        (
            "missing Host on HTTP/1.1",
            format!("GET /shop/v1/charges/a HTTP/1.1\r\nx-uapk-capability: {tok}\r\nConnection: close\r\n\r\n")
                .into_bytes(),
            &[200, 400],
        ),
        ("https absolute-form on the proxy", req("GET https://shop.test/x HTTP/1.1", &tok, "", ""), &[400]),
        ("CONNECT in origin form", req("CONNECT /x HTTP/1.1", &tok, "", ""), &[400]),
    ];
    let n = cases.len();
    for (name, bytes, want) in cases {
        let resp = raw(&gw, &bytes).await;
        let status = status_of(&resp);
        assert!(want.contains(&status), "{name}: got {status}, want one of {want:?}: {resp:.300}");
        alive(&gw, &tok).await;
    }
    assert!(n >= 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_around_route_matching() {
    let (gw, _) = start().await;
    let tok = token("pay-agent");
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("/shop/v1/refunds/../admin", 400, None),
        ("/shop/v1/charges/../../admin", 400, None),
        ("/shop/v1/charges/%2e%2e/x", 400, None),
        ("/shop/v1/charges/%2E%2E/x", 400, None),
        ("/shop/v1/charges/a%2Fb", 400, None),
        ("/shop/v1/charges/%252e%252e/x", 400, None),
        ("/shop/v1/charges/a%5cb", 400, None),
        ("/shop/v1/charges/a\\b", 400, None),
        ("/shop/v1/./charges/x", 400, None),
        ("/shop//v1/charges/x", 403, Some("route_not_allowed")),
        ("/shop/v1/Charges/x", 403, Some("route_not_allowed")),
        ("/shop/v1/%63harges/x", 403, Some("route_not_allowed")),
        ("/shop/v1/refunds", 403, Some("route_not_allowed")), // GET on a POST route
        ("/shop/v1/charges/x.", 200, None),
        ("/shop", 403, Some("route_not_allowed")),
        ("/", 404, Some("route_not_allowed")),
    ];
    for (path, want, code) in cases {
        let resp = raw(&gw, &req(&format!("GET {path} HTTP/1.1"), &tok, "", "")).await;
        assert_eq!(status_of(&resp), *want, "{path}: {resp:.300}");
        if let Some(code) = code {
            assert!(resp.contains(code), "{path}: {resp:.300}");
        }
        if *want == 403 {
            let idx = record_of(&resp).expect("a refused identified request has a record");
            let e = &gw.entries()[idx as usize];
            assert_eq!(e["kind"], "decision", "{path}");
        }
        alive(&gw, &tok).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_timeouts_and_misbehaving_upstreams() {
    let (gw, up) = start().await;
    let tok = token("pay-agent");
    // Body over the limit: by Content-Length (early) and chunked (while reading).
    let resp = raw(
        &gw,
        &req("POST /shop/v1/refunds HTTP/1.1", &tok, "Content-Length: 5000\r\nx-country: US\r\n", &"x".repeat(5000)),
    )
    .await;
    assert_eq!(status_of(&resp), 413, "{resp:.300}");
    assert!(record_of(&resp).is_some());
    let chunk = "a".repeat(600);
    let body = format!("{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len(), chunk.len());
    let resp = raw(
        &gw,
        &req("POST /shop/v1/refunds HTTP/1.1", &tok, "Transfer-Encoding: chunked\r\nx-country: US\r\n", &body),
    )
    .await;
    assert_eq!(status_of(&resp), 413, "{resp:.300}");
    alive(&gw, &tok).await;
    // A body that stalls: 408 after limits.body_read_timeout, with a record.
    let started = Instant::now();
    let resp = raw(
        &gw,
        &req("POST /shop/v1/refunds HTTP/1.1", &tok, "Content-Length: 100\r\nx-country: US\r\n", "{\"amount\":"),
    )
    .await;
    assert_eq!(status_of(&resp), 408, "{resp:.300}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(resp.contains("body_timeout"));
    // A deeply nested JSON body is refused, not a stack overflow.
    let deep = format!("{{\"amount\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let deep = &deep[..1000];
    let resp = raw(
        &gw,
        &req(
            "POST /shop/v1/refunds HTTP/1.1",
            &tok,
            &format!("Content-Length: {}\r\nContent-Type: application/json\r\nx-country: US\r\n", deep.len()),
            deep,
        ),
    )
    .await;
    assert_eq!(status_of(&resp), 403, "{resp:.300}");
    assert!(resp.contains("amount_invalid"));
    alive(&gw, &tok).await;
    // Slow-loris headers: closed by the gateway after limits.header_read_timeout.
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(b"GET /shop/v1/charges/a HTTP/1.1\r\nHost: gw\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut out)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "slow-loris connection held {:?}", started.elapsed());
    alive(&gw, &tok).await;
    // The upstream closes mid-response: the client sees a truncated body, an outcome records it.
    let r = gw.get("/shop/v1/charges/close", &tok).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "a truncated body must surface as an error");
    eventually("an outcome entry saying the upstream closed mid-response", Duration::from_secs(5), async || {
        let mid_response = |e: &Value| e["error"].as_str().is_some_and(|m| m.contains("mid-response"));
        gw.entries().iter().any(|e| e["kind"] == "outcome" && mid_response(e)).then_some(())
    })
    .await;
    // The upstream never answers: 504.
    let r = gw.get("/shop/v1/charges/hang", &tok).await;
    assert_eq!(r.status(), 504);
    // 100 MB streamed through without being buffered, by a gateway process of its own: its
    // memory is the gateway's alone (this process runs other tests beside this one).
    let child = ChildGateway::start(&[("pay.yaml", manifest("pay-agent", up, POLICY, ""))], LIMITS, None).await;
    let rss = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", child.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let before = rss();
    let huge = format!("http://{}/shop/v1/charges/huge", child.proxy);
    let mut r = client().get(huge).header("x-uapk-capability", &tok).send().await.unwrap();
    let mut total = 0u64;
    let mut peak = before;
    while let Some(c) = r.chunk().await.unwrap() {
        total += c.len() as u64;
        peak = peak.max(rss());
    }
    assert_eq!(total, 100 << 20);
    assert!(peak - before < 60 * 1024, "RSS grew by {} kB while streaming 100 MB", peak - before);
    alive(&gw, &tok).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_identity_tricks() {
    let (gw, up) = start().await;
    let tok = token("pay-agent");
    // Connection-named headers are hop-by-hop: nothing is smuggled upstream.
    let r = client()
        .get(gw.base("/shop/v1/charges/conn"))
        .header("x-uapk-capability", &tok)
        .header("connection", "x-uapk-foo, authorization")
        .header("x-uapk-foo", "1")
        .header("authorization", "Bearer agent")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["auth"].as_bool(), v["foo"].as_bool()), (Some(false), Some(false)), "{v}");
    // A token in both Proxy-Authorization and x-uapk-capability in base-URL mode: the header wins.
    let r = client()
        .get(gw.base("/shop/v1/charges/a"))
        .header("x-uapk-capability", &tok)
        .header("proxy-authorization", "Bearer garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Explicit proxy: absolute-form vs Host conflict, bad Basic credentials, odd ports.
    let target = format!("http://127.0.0.1:{}/v1/charges/a", up.port());
    let resp = raw(&gw, format!("GET {target} HTTP/1.1\r\nHost: evil.example\r\nProxy-Authorization: Bearer {tok}\r\nConnection: close\r\n\r\n").as_bytes()).await;
    assert_eq!(status_of(&resp), 400, "{resp:.300}");
    let resp = raw(&gw, format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nProxy-Authorization: Basic !!!notbase64\r\nConnection: close\r\n\r\n", up.port()).as_bytes()).await;
    assert_eq!(status_of(&resp), 407, "{resp:.300}");
    let resp = raw(&gw, format!("GET http://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\nProxy-Authorization: Bearer {tok}\r\nConnection: close\r\n\r\n").as_bytes()).await;
    assert_eq!(status_of(&resp), 403);
    assert!(resp.contains("host_not_allowed"));
    // CONNECT to a port no connector allows, and without a port.
    let resp = raw(
        &gw,
        format!("CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nProxy-Authorization: Bearer {tok}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 403, "{resp:.300}");
    let resp = raw(
        &gw,
        format!("CONNECT 127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\nProxy-Authorization: Bearer {tok}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 400, "{resp:.300}");
    // TLS garbage after a successful CONNECT to an intercept connector: the tunnel just closes.
    let (mut s, head) = connect(gw.proxy, &format!("shop.test:{}", up.port()), &tok).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let _ = s.write_all(b"\x16\x03\x01\x00\x05garbagegarbagegarbage").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    alive(&gw, &tok).await;
    // A header param that is not text counts as missing: the list that needs it denies.
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("x-country", reqwest::header::HeaderValue::from_bytes(b"\xffUS").unwrap());
    let r = client()
        .post(gw.base("/shop/v1/refunds"))
        .header("x-uapk-capability", &tok)
        .headers(h)
        .json(&serde_json::json!({"amount": 100, "currency": "USD", "customer": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["reasons"][0]["code"], "jurisdiction_not_allowed");
    // An unknown method on a route that lists methods.
    let resp = raw(&gw, &req("FOO /shop/v1/charges/a HTTP/1.1", &tok, "", "")).await;
    assert_eq!(status_of(&resp), 403);
    assert!(resp.contains("route_not_allowed"));
    // 1000 junk connections at once, then a normal request.
    let junk: Vec<_> = (0..1000)
        .map(|i| {
            let addr = gw.proxy;
            tokio::spawn(async move {
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    let _ = s
                        .write_all(if i % 2 == 0 { b"\x00\x01\x02garbage\r\n\r\n" } else { b"GET / HTTP/1.1\r\n" })
                        .await;
                }
            })
        })
        .collect();
    for j in junk {
        let _ = j.await;
    }
    alive(&gw, &tok).await;
}

/// Sends `head` (a request head without the final blank line) and reads the response head.
async fn open_raw(gw: &TestGateway, head: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(format!("{head}\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_upgrades_pass() {
    let (gw, up) = start().await;
    let tok = token("pay-agent");
    // h2c smuggling: after a 101 the agent would talk raw HTTP/2 to the upstream, undecided.
    let cases = [
        ("GET", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
        ("GET", "Connection: upgrade\r\nUpgrade: websocket, h2c\r\n"),
        ("GET", "Connection: upgrade\r\nUpgrade: TLS/1.2\r\n"),
        // An Upgrade header without Connection: upgrade is refused too, not silently dropped.
        ("GET", "Upgrade: h2c\r\n"),
        ("POST", "Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n"),
    ];
    for (method, headers) in cases {
        let path = if method == "GET" { "/shop/v1/charges/ch_1" } else { "/shop/v1/refunds" };
        let resp = raw(&gw, &req(&format!("{method} {path} HTTP/1.1"), &tok, headers, "")).await;
        assert_eq!(status_of(&resp), 400, "{headers}: {resp:.400}");
        assert!(resp.contains("upgrade_not_allowed"), "{resp:.400}");
        let e = gw.entry(record_of(&resp).expect("a record index"));
        assert_eq!(
            (e["decision"].as_str(), e["reasons"][0]["code"].as_str()),
            (Some("deny"), Some("upgrade_not_allowed"))
        );
        assert_eq!(e["agent"], "pay-agent");
    }
    // Through the explicit proxy too.
    let resp = raw(
        &gw,
        format!(
            "GET http://127.0.0.1:{p}/v1/charges/x HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nProxy-Authorization: Bearer {tok}\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            p = up.port()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 400, "{resp:.400}");
    assert!(resp.contains("upgrade_not_allowed"));

    // An upstream that answers a WebSocket request by switching to h2c is not spliced.
    // (A WebSocket that is switched and spliced: foundation.rs.)
    let (mut s, head) = open_raw(
        &gw,
        &format!("GET /shop/v1/charges/switch-h2c HTTP/1.1\r\nHost: gw\r\nx-uapk-capability: {tok}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
    assert!(!String::from_utf8_lossy(&rest).contains("RAW-UPSTREAM"), "upstream bytes reached the agent");
    // Its outcome names the refusal.
    let outcomes: Vec<Value> = gw.entries().into_iter().filter(|e| e["kind"] == "outcome").collect();
    assert!(outcomes.iter().any(|o| o["status"] == "502"), "{outcomes:?}");
    alive(&gw, &tok).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_travel_in_cleartext_and_agent_credentials_are_stripped() {
    let up = Upstream::start().await;
    let p = up.addr.port();
    let connectors = format!(
        r#"connectors:
  - name: secure
    base_url: https://secure.test:{p}
    hosts: [secure.test]
    ports: [{p}]
    credentials:
      - header: Authorization
        value: "Bearer sk_live_${{file:secret}}"
    routes:
      - path: /**
        action: secure.any
  - name: keyed
    hosts: [keyed.test]
    ports: [{p}]
    credentials:
      - header: x-api-key
        value: "sk_keyed_${{file:secret}}"
    routes:
      - path: /**
        action: keyed.any
  - name: plainauth
    base_url: http://{addr}
    hosts: [plain.test]
    ports: [{p}]
    credentials:
      - header: Authorization
        value: "Bearer sk_plain_${{file:secret}}"
    strip_headers: [x-session-hint]
    routes:
      - path: /**
        action: plain.any
"#,
        addr = up.addr
    );
    let policy = "  connectors: { allow: [shop, secure, keyed, plainauth] }\n";
    let m = manifest("pay-agent", up.addr, policy, "").replacen("connectors:\n", &connectors, 1);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/secret"), "s3cr3t\n").unwrap();
    let gw = TestGateway::start_in(dir, &[("pay.yaml", m)], "").await;
    let tok = token("pay-agent");

    // Absolute-form http:// to an https connector (the port is even TLS's), and to a connector
    // that injects credentials with no base_url: refused before anything is dialled.
    for (host, name) in [("secure.test", "secure"), ("keyed.test", "keyed")] {
        let resp = raw(
            &gw,
            format!(
                "GET http://{host}:{p}/v1/balance HTTP/1.1\r\nHost: {host}:{p}\r\nProxy-Authorization: Bearer {tok}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&resp), 403, "{resp:.400}");
        assert!(resp.contains("cleartext_not_allowed"), "{resp:.400}");
        assert!(!resp.contains("s3cr3t"), "the secret leaked into a response");
        let record = record_of(&resp).unwrap();
        let e = gw.entry(record);
        assert_eq!(
            (e["connector"].as_str(), e["reasons"][0]["code"].as_str()),
            (Some(name), Some("cleartext_not_allowed"))
        );
        // The refusal in the shape agent SDKs show (type, code, one-line message with the record).
        let body = body_json(&resp);
        assert_eq!(body["error"]["type"], "uapk_deny");
        assert_eq!(body["error"]["code"], "cleartext_not_allowed");
        let msg = body["error"]["message"].as_str().unwrap();
        let want_end = format!("(record {record})");
        assert!(msg.starts_with("deny: cleartext_not_allowed: connector ") && msg.ends_with(&want_end), "{msg}");
        assert!(!e.to_string().contains("s3cr3t"));
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream in cleartext");

    // A connector whose base_url is http:// injects its credential, and only its credential:
    // every agent-supplied credential header, its strip_headers and forwarding headers are gone.
    let r = client()
        .get(gw.base("/plainauth/v1/items"))
        .header("x-uapk-capability", &tok)
        .header("authorization", "Bearer agent-chosen")
        .header("x-api-key", "agent-key")
        .header("api-key", "agent-key")
        .header("cookie", "session=agent")
        .header("x-session-hint", "agent")
        .header("forwarded", "for=203.0.113.9")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-host", "admin.internal")
        .header("x-real-ip", "203.0.113.9")
        .header("x-request-tag", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.last();
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth, ["Bearer sk_plain_s3cr3t"]);
    for gone in [
        "x-api-key",
        "api-key",
        "cookie",
        "x-session-hint",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-real-ip",
    ] {
        assert!(seen.headers.get(gone).is_none(), "{gone} reached the upstream");
    }
    assert_eq!(seen.headers.get("x-request-tag").unwrap(), "kept");
    // A connector without credentials keeps the agent's own authorization, but never the
    // forwarding headers.
    let r = client()
        .get(gw.base("/shop/v1/charges/ch_1"))
        .header("x-uapk-capability", &tok)
        .header("authorization", "Bearer agents-own")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.last();
    assert_eq!(seen.headers.get("authorization").unwrap(), "Bearer agents-own");
    assert!(seen.headers.get("x-forwarded-for").is_none());
}

/// The refusal's status, first reason code and record index, after checking that the record
/// in the log says the same.
async fn refused(gw: &TestGateway, r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    let code = reason(&v).to_string();
    let record = v["record"].as_u64().unwrap_or_else(|| panic!("no record index: {v}"));
    let entry = gw.entry(record);
    assert_eq!(entry["kind"], "decision");
    assert_eq!(entry["decision"], "deny", "{entry}");
    assert_eq!(entry["reasons"][0]["code"], code.as_str(), "{entry}");
    (status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_time_claims_and_crit_headers_are_refused() {
    let up = Upstream::start().await;
    let approver = "uapk_test_approver";
    let admin = admin_keys(&[("ops", approver, "approver")]);
    let gw = TestGateway::start(&[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))], &admin).await;
    let now = now();
    let claims = |iat: i64, exp: i64, nbf: Option<i64>| {
        let mut c = serde_json::json!({"iss": "platform", "sub": "pay-agent", "aud": "uapk-gateway",
            "iat": iat, "exp": exp, "jti": rand_hex()});
        if let Some(nbf) = nbf {
            c["nbf"] = nbf.into();
        }
        c.to_string()
    };
    let plain = r#"{"alg":"EdDSA","typ":"JWT"}"#;
    let key = issuer_key();
    // The control: these bytes, signed this way, are a good token.
    let good = sign_jws(&key, plain, &claims(now, now + 3600, None));
    alive(&gw, &good).await;
    let before = up.count();
    let cases = [
        ("exp - iat overflows i64", sign_jws(&key, plain, &claims(-(1i64 << 62), i64::MAX - 1, None))),
        ("exp after the year 9999", sign_jws(&key, plain, &claims(now, 253_402_300_800, None))),
        ("negative nbf", sign_jws(&key, plain, &claims(now, now + 3600, Some(-1)))),
        ("lifetime above max_lifetime", sign_jws(&key, plain, &claims(now, now + 86_401, None))),
        (
            "crit header",
            sign_jws(&key, r#"{"alg":"EdDSA","typ":"JWT","crit":["exp"]}"#, &claims(now, now + 3600, None)),
        ),
        ("alg twice", sign_jws(&key, r#"{"alg":"none","alg":"EdDSA"}"#, &claims(now, now + 3600, None))),
    ];
    let target = format!("http://127.0.0.1:{}/v1/charges/ch_1", up.addr.port());
    for (name, tok) in &cases {
        // Base-URL mode: 403.
        let r = gw.get("/shop/v1/charges/ch_1", tok).await;
        assert_eq!(refused(&gw, r).await, (403, "capability_token_invalid".into()), "{name}");
        // Explicit proxy: 407.
        let resp = raw(
            &gw,
            format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nProxy-Authorization: Bearer {tok}\r\nConnection: close\r\n\r\n", up.addr.port())
                .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&resp), 407, "{name}: {resp:.300}");
        assert!(resp.contains("capability_token_invalid"), "{name}: {resp:.300}");
        let entry = gw.entry(record_of(&resp).expect("record index"));
        assert_eq!(entry["reasons"][0]["code"], "capability_token_invalid", "{name}");
    }
    assert_eq!(up.count(), before, "no refused token reached the upstream");

    // Override tokens: an approval's genuine token re-signed by the gateway's own key with a
    // crit header, or with absurd times, is refused, and the approval stays unused.
    let v: Value = gw.refund(&good, 6000, None).await.json().await.unwrap();
    let id = v["approval_id"].as_str().expect("escalated").to_string();
    let over = gw.approve(&id, approver).await.1["override_token"].as_str().expect("override token").to_string();
    let payload = {
        use base64::Engine;
        let seg = over.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(seg).unwrap();
        serde_json::from_slice::<Value>(&bytes).unwrap()
    };
    let gateway_key = uapk_gateway::identity::load_signing_key(&gw.data().join("gateway.pem")).unwrap();
    let mut absurd = payload.clone();
    absurd["iat"] = (-(1i64 << 62)).into();
    absurd["exp"] = (i64::MAX - 1).into();
    let forged = [
        ("crit", sign_jws(&gateway_key, r#"{"alg":"EdDSA","typ":"JWT","crit":["approval_id"]}"#, &payload.to_string())),
        ("overflowing times", sign_jws(&gateway_key, plain, &absurd.to_string())),
    ];
    let before = up.count();
    for (name, tok) in forged {
        let r = gw.refund(&good, 6000, Some(&tok)).await;
        assert_eq!(refused(&gw, r).await, (403, "override_token_invalid".into()), "{name}");
    }
    assert_eq!(up.count(), before);
    // The control: the same claims under the gateway's own header go through, once.
    let r = gw.refund(&good, 6000, Some(&sign_jws(&gateway_key, plain, &payload.to_string()))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.count(), before + 1);
}
