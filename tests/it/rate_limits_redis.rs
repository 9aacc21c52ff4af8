//! Fleet-wide rate limits (`rate_limits.backend: redis`, SPEC §15.3, §15.4): two gateways on one
//! `redis-server` of their own (a free loopback port, a temporary directory, no persistence)
//! enforce one limit between them, a refused request takes nothing, and a Redis that goes away
//! fails closed for agents with rate limits only, then recovers by itself.
//!
//! Without the `redis-server` binary (Debian package `redis-server`) the tests say so and pass,
//! except with `CI` set, where they fail.

use crate::support::redis::RedisServer;
use crate::support::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `limited-agent` under [`LIMITED`] and `free-agent` without rate limits.
fn limited_and_free(up: &Upstream) -> [(&'static str, String); 2] {
    [
        ("limited.yaml", manifest("limited-agent", up.addr, &format!("{POLICY}{LIMITED}"), "")),
        ("free.yaml", manifest("free-agent", up.addr, POLICY, "")),
    ]
}

const LIMITED: &str = "  rate_limits:\n    - scope: agent\n      rate: 5/m\n      burst: 5\n";

/// A request of `agent` for `payment.read` through `gw`: (status, reason code, Retry-After).
async fn read(c: &reqwest::Client, gw: &TestGateway, agent: &str, id: usize) -> (u16, String, Option<u64>) {
    read_with(c, gw, &token(agent), id).await
}

async fn read_with(c: &reqwest::Client, gw: &TestGateway, token: &str, id: usize) -> (u16, String, Option<u64>) {
    let r =
        c.get(gw.base(&format!("/shop/v1/charges/ch_{id}"))).header("x-uapk-capability", token).send().await.unwrap();
    answer(r).await
}

async fn answer(r: reqwest::Response) -> (u16, String, Option<u64>) {
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, reason(&v).to_string(), retry)
}

/// The decision entries of `gw`'s log for `agent`, as (decision, first reason code).
fn recorded(gw: &TestGateway, agent: &str) -> Vec<(String, String)> {
    decisions(&gw.entries())
        .into_iter()
        .filter(|e| e["agent"] == agent)
        .map(|e| (e["decision"].as_str().unwrap_or_default().to_string(), reason(&e).to_string()))
        .collect()
}

async fn two_gateways(config: &str, manifests: &[(&str, String)]) -> (TestGateway, TestGateway) {
    let a = TestGateway::start(manifests, config).await;
    let b = TestGateway::start(manifests, config).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_limit() {
    let Some(redis) = RedisServer::start() else { return };
    let up = Upstream::start().await;
    let files = [("limited.yaml", manifest("limited-agent", up.addr, &format!("{POLICY}{LIMITED}"), ""))];
    // 30 requests at once through two debug-build gateways on a small machine: give Redis
    // round trips time to be scheduled (the 100ms default is exercised by the failure test).
    let (a, b) = two_gateways(&redis.config_with_timeout("2s"), &files).await;
    let c = client();
    let (a, b) = (&a, &b);
    let tok = token("limited-agent");
    let tok = &tok;
    let answers = futures_util::future::join_all((0..30).map(|i| {
        let c = c.clone();
        async move { read_with(&c, if i % 2 == 0 { a } else { b }, tok, i).await }
    }))
    .await;
    let passed = answers.iter().filter(|(s, _, _)| *s == 200).count();
    assert_eq!(passed, 5, "{answers:?}");
    assert_eq!(up.count(), 5, "the upstream received exactly the 5 the fleet-wide limit allows");
    for (status, code, retry) in answers.iter().filter(|(s, _, _)| *s != 200) {
        assert_eq!((*status, code.as_str()), (429, "rate_limited"));
        // 5 per minute: one unit every 12 s.
        let retry = retry.expect("Retry-After");
        assert!((1..=12).contains(&retry), "Retry-After {retry}");
    }
    // Both gateways refused some, and recorded each refusal.
    let refused_a = recorded(a, "limited-agent").iter().filter(|(d, c)| d == "deny" && c == "rate_limited").count();
    let refused_b = recorded(b, "limited-agent").iter().filter(|(d, c)| d == "deny" && c == "rate_limited").count();
    assert_eq!(refused_a + refused_b, 25);
    // The state lives in Redis, under uapk:rl:, with an expiry.
    let metrics = a.metrics().await;
    assert!(metrics.contains("uapk_state_up{backend=\"redis\"} 1"), "{metrics}");
    assert!(
        metrics.contains("uapk_state_duration_seconds_count{backend=\"redis\",op=\"rate_limit\"} "),
        "each gateway measured its round trips"
    );
    assert_eq!(a.readyz().await.1["rate_limits"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_one_limit_takes_nothing_from_the_others() {
    let Some(redis) = RedisServer::start() else { return };
    let up = Upstream::start().await;
    // A: the agent, 2 a minute. B: each action, 1 an hour.
    let limits = "  rate_limits:\n    - scope: agent\n      rate: 2/m\n      burst: 2\n    - scope: action\n      rate: 1/h\n      burst: 1\n";
    let files = [("two.yaml", manifest("two-limits-agent", up.addr, &format!("{POLICY}{limits}"), ""))];
    let (a, b) = two_gateways(&redis.config(), &files).await;
    let c = client();
    assert_eq!(read(&c, &a, "two-limits-agent", 0).await.0, 200);
    // B refuses these (on either gateway); none of them takes from A.
    for i in 1..6 {
        let r = c
            .get(b.base(&format!("/shop/v1/charges/ch_{i}")))
            .header("x-uapk-capability", token("two-limits-agent"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["ratelimit-policy"], "\"action\";q=1;w=3600");
        assert_eq!(r.headers()["retry-after"], "3600");
    }
    // A still has its second unit: another action passes, on the other gateway.
    let charge = |gw: &TestGateway| {
        c.post(gw.base("/shop/v1/charges"))
            .header("x-uapk-capability", token("two-limits-agent"))
            .json(&json!({"amount": "1.00", "currency": "USD"}))
    };
    let r = charge(&b).send().await.unwrap();
    assert_eq!(answer(r).await.0, 200);
    // Now A is spent: a third action is refused by A, not B.
    let r = c
        .post(a.base("/shop/v1/refunds"))
        .header("x-uapk-capability", token("two-limits-agent"))
        .header("x-country", "US")
        .json(&json!({"amount": 5, "currency": "USD", "customer": "cus_1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["ratelimit-policy"], "\"agent\";q=2;w=60");
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_for_rate_limited_agents_and_recovers_by_itself() {
    let Some(mut redis) = RedisServer::start() else { return };
    let up = Upstream::start().await;
    let gw = TestGateway::start(&limited_and_free(&up), &redis.config()).await;
    let c = client();
    assert_eq!(read(&c, &gw, "limited-agent", 0).await.0, 200);
    assert_eq!(gw.readyz().await.0, 200);
    assert_eq!(up.count(), 1);

    // Slower than rate_limits.redis.timeout (100ms): refused, promptly.
    redis.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let (status, code, _) = read(&c, &gw, "limited-agent", 1).await;
    assert_eq!((status, code.as_str()), (503, "rate_limit_unavailable"));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    redis.signal(libc::SIGCONT);
    let resumed = Instant::now();
    let mut i = 100;
    let mut unavailable = 1;
    while read(&c, &gw, "limited-agent", i).await.0 != 200 {
        unavailable += 1;
        assert!(resumed.elapsed() < Duration::from_secs(5), "not served 5 s after Redis resumed");
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up.count(), 2);

    // Gone: refused, recorded, nothing forwarded; an agent without rate limits is served.
    redis.kill();
    for i in 2..5 {
        let (status, code, _) = read(&c, &gw, "limited-agent", i).await;
        assert_eq!((status, code.as_str()), (503, "rate_limit_unavailable"));
        unavailable += 1;
    }
    assert_eq!(read(&c, &gw, "free-agent", 5).await.0, 200);
    assert_eq!(up.count(), 3, "only the free agent's request reached the upstream");
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["rate_limits"], false, "{body}");
    assert_eq!(body["audit_writable"], true, "{body}");
    let metrics = gw.metrics().await;
    assert!(metrics.contains("uapk_state_up{backend=\"redis\"} 0"), "{metrics}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let r = recorded(&gw, "limited-agent");
        let n = r.iter().filter(|(d, c)| d == "deny" && c == "rate_limit_unavailable").count();
        if n >= unavailable || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused, unavailable, "every refusal is in the log");

    // Back on the same port: served again within 5 s, without restarting the gateway.
    redis.spawn();
    let back = Instant::now();
    let mut i = 10;
    loop {
        let (status, code, _) = read(&c, &gw, "limited-agent", i).await;
        if status == 200 {
            break;
        }
        assert_eq!((status, code.as_str()), (503, "rate_limit_unavailable"));
        assert!(back.elapsed() < Duration::from_secs(5), "not served 5 s after Redis came back");
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up.count(), 4);
    let ready = eventually("readyz to be 200 again", Duration::from_secs(5), async || {
        let (status, body) = gw.readyz().await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(ready["rate_limits"], true);
}

#[test]
fn check_rejects_two_urls_and_warns_about_an_inline_password() {
    let dir = tempfile::tempdir().unwrap();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("a.yaml"), manifest("check-agent", up, POLICY, "")).unwrap();
    let url_file = dir.path().join("redis-url");
    std::fs::write(&url_file, "redis://:file-s3cret@10.0.0.1:6379\n").unwrap();
    let write = |rate_limits: &str| {
        let p = dir.path().join("gateway.yaml");
        std::fs::write(&p, format!("policies: {}\n{rate_limits}", policies.display())).unwrap();
        p
    };
    let both = write(&format!(
        "rate_limits:\n  backend: redis\n  redis:\n    url_file: {}\n    url: redis://10.0.0.1:6379\n",
        url_file.display()
    ));
    let (code, out, err) = run_cli(&["check", "-c", both.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("rate_limits.redis.url") && err.contains("not both"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");

    let inline = write("rate_limits:\n  backend: redis\n  redis:\n    url: redis://:inline-s3cret@10.0.0.1:6379\n");
    let (code, out, err) = run_cli(&["check", "-c", inline.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning") && err.contains("rate_limits.redis.url") && err.contains("redis://:***@10.0.0.1:6379"),
        "{err}"
    );
    assert!(!err.contains("s3cret") && !out.contains("s3cret"), "{out}{err}");

    let from_file = write(&format!("rate_limits:\n  backend: redis\n  redis:\n    url_file: {}\n", url_file.display()));
    let (code, out, err) = run_cli(&["check", "-c", from_file.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("warning"), "a password in url_file is where it belongs: {err}");

    let unknown = write("rate_limits:\n  backend: memcached\n");
    let (code, _, err) = run_cli(&["check", "-c", unknown.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("rate_limits.backend"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_reaches_records_metrics_or_readyz() {
    let Some(redis) = RedisServer::start() else { return };
    let up = Upstream::start().await;
    let files = [("limited.yaml", manifest("limited-agent", up.addr, &format!("{POLICY}{LIMITED}"), ""))];
    // A password Redis does not ask for is accepted (AUTH default) ... or refused: either way
    // the gateway must not show it.
    let config =
        format!("rate_limits:\n  backend: redis\n  redis:\n    url: redis://:pw-s3cret@127.0.0.1:{}/0\n", redis.port);
    let gw = TestGateway::start(&files, &config).await;
    let c = client();
    let _ = read(&c, &gw, "limited-agent", 0).await;
    let metrics = gw.metrics().await;
    assert!(!metrics.contains("s3cret"));
    let (_, ready) = gw.readyz().await;
    assert!(!ready.to_string().contains("s3cret"));
    for e in gw.entries() {
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
    assert!(!format!("{:?}", gw.config()).contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_redis_is_down_serves_once_it_is_up() {
    let Some(mut redis) = RedisServer::start() else { return };
    redis.kill();
    let up = Upstream::start().await;
    let gw = TestGateway::start(&limited_and_free(&up), &redis.config()).await;
    let c = client();
    let (status, body) = gw.readyz().await;
    assert_eq!((status, &body["rate_limits"]), (503, &Value::Bool(false)), "{body}");
    assert_eq!(read(&c, &gw, "limited-agent", 0).await.1, "rate_limit_unavailable");
    assert_eq!(read(&c, &gw, "free-agent", 1).await.0, 200);
    redis.spawn();
    eventually("readyz to be 200 once Redis is up", Duration::from_secs(5), async || {
        (gw.readyz().await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(read(&c, &gw, "limited-agent", 2).await.0, 200);
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_taken_by_a_request_refused_later_goes_back_to_redis() {
    let Some(redis) = RedisServer::start() else { return };
    let up = Upstream::start().await;
    let m = meter_manifest(up.addr, "  rate_limits:\n    - scope: agent\n      rate: 1/h\n      burst: 1\n");
    let files = [("meter.yaml", m)];
    let gw = TestGateway::start(&files, &format!("identity:\n  default_agent: meter-agent\n{}", redis.config())).await;
    let c = client();
    // Past the rate limit (one unit taken in Redis), then refused by the SSRF guard: the unit
    // is given back, so each of these meets the guard, not the limit.
    for i in 0..3 {
        let (status, code, _) = answer(c.get(gw.base(&format!("/meta/latest/{i}"))).send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (403, "ssrf_blocked"));
    }
    let (status, _, _) = answer(c.get(gw.base("/shop/v1/a")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, code, _) = answer(c.get(gw.base("/shop/v1/b")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_reaches_the_gateways_log() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_policies(d, &[("limited.yaml", manifest("limited-agent", up.addr, &format!("{POLICY}{LIMITED}"), ""))]);
    // Nothing listens on the Redis port: the gateway starts, fails closed and says so in its log.
    let (proxy, admin, nothing) = (free_port(), free_port(), free_port());
    let redis =
        format!("rate_limits:\n  backend: redis\n  redis:\n    url: redis://:log-s3cret@127.0.0.1:{nothing}/0\n");
    let config = d.join("gateway.yaml");
    std::fs::write(&config, gateway_yaml(d, &format!("127.0.0.1:{proxy}"), &format!("127.0.0.1:{admin}"), &redis))
        .unwrap();
    let log = d.join("gw.log");
    let mut child = spawn_gateway(&config, &log, &[("UAPK_LOG", "info")]);
    let ready = eventually("the admin listener", Duration::from_secs(20), async || {
        let r = client().get(format!("http://127.0.0.1:{admin}/readyz")).send().await.ok()?;
        Some(r.json::<Value>().await.unwrap())
    })
    .await;
    assert_eq!(ready["rate_limits"], false, "{ready}");
    let r = client()
        .get(format!("http://127.0.0.1:{proxy}/shop/v1/charges/ch_1"))
        .header("x-uapk-capability", token("limited-agent"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = answer(r).await;
    assert_eq!((status, code.as_str()), (503, "rate_limit_unavailable"));
    let metrics = client().get(format!("http://127.0.0.1:{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    // A ping or two more, then stop.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("redis://:***@127.0.0.1:{nothing}/0")), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(!metrics.contains("s3cret") && metrics.contains("uapk_state_up{backend=\"redis\"} 0"), "{metrics}");
    assert_eq!(up.count(), 0);
}

#[test]
fn rate_limits_config_defaults_and_url_file() {
    use uapk_gateway::config::{RateLimitBackend, load_gateway};
    assert!(matches!(load_gateway(None).unwrap().rate_limits, RateLimitBackend::Local));
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("url");
    std::fs::write(&url_file, "rediss://:f1le-s3cret@redis.internal:6380/2\n").unwrap();
    let p = dir.path().join("gateway.yaml");
    std::fs::write(&p, format!("rate_limits:\n  backend: redis\n  redis:\n    url_file: {}\n", url_file.display()))
        .unwrap();
    let RateLimitBackend::Redis(r) = load_gateway(Some(&p)).unwrap().rate_limits else { panic!("redis") };
    assert_eq!(r.timeout, Duration::from_millis(100));
    assert_eq!(r.url.expose(), "rediss://:f1le-s3cret@redis.internal:6380/2");
    assert_eq!(r.url.to_string(), "rediss://:***@redis.internal:6380/2");
    assert!(r.ca_file.is_none());
    for (yaml, key) in [
        ("rate_limits:\n  backend: redis\n", "rate_limits.redis"),
        ("rate_limits:\n  backend: redis\n  redis:\n    url: http://x\n", "rate_limits.redis.url"),
        (
            "rate_limits:\n  backend: redis\n  redis:\n    url: redis://x\n    timeout: 0ms\n",
            "rate_limits.redis.timeout",
        ),
        ("rate_limits:\n  backend: redis\n  redis:\n    url: redis://x\n    pool: 3\n", "pool"),
    ] {
        std::fs::write(&p, yaml).unwrap();
        let e = load_gateway(Some(&p)).expect_err(yaml).to_string();
        assert!(e.contains(key), "{yaml}: {e}");
    }
}
