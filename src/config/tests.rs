use super::*;
use std::path::Path;

const PUB: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGKJGDCQoegPDW1GQi9Dm5EQ4vIie1I1synRGq5+olxA=\n-----END PUBLIC KEY-----\n";

fn good_manifest() -> String {
    format!(
        r#"apiVersion: uapk/v1
kind: Manifest
agent:
  id: test-agent
capability:
  issuers:
    - id: platform
      public_key: |
{}
connectors:
  - name: shop
    base_url: http://127.0.0.1:9999
    routes:
      - methods: [POST]
        path: /v1/orders/{{order}}
        action: order.create
        params:
          amount: {{ json: /amount, scale: 2 }}
          order: {{ path: order }}
policy:
  connectors: {{ allow: [shop] }}
  rate_limits:
    - rate: 10/s
      burst: 5
"#,
        PUB.lines().map(|l| format!("        {l}")).collect::<Vec<_>>().join("\n")
    )
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn errors_of(text: &str) -> Vec<Diagnostic> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.yaml", text);
    match load_manifest(&p, Strictness::Check) {
        Ok(_) => Vec::new(),
        Err(Diagnostics(d)) => d,
    }
}

#[test]
fn a_good_manifest_loads_into_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.yaml", &good_manifest());
    let (m, warnings) = load_manifest(&p, Strictness::Check).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(m.agent.id, "test-agent");
    assert_eq!(m.capability.issuers.len(), 1);
    let c = m.connector("shop").unwrap();
    assert_eq!(c.hosts, vec!["127.0.0.1".to_string()]);
    assert_eq!(c.ports, vec![9999]);
    let (r, caps) = c.route(&http::Method::POST, "/v1/orders/42").unwrap();
    assert_eq!(r.action, "order.create");
    assert_eq!(caps, vec![("order".to_string(), "42".to_string())]);
    assert!(c.route(&http::Method::GET, "/v1/orders/42").is_none());
    assert_eq!(m.policy.rate_limits[0].burst, 5);
}

#[test]
fn unknown_key_is_reported_with_file_line_and_path() {
    let text = good_manifest().replace("  rate_limits:", "  rate_limitz:");
    let errs = errors_of(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let shown = errs[0].to_string();
    assert!(shown.contains("m.yaml:"), "{shown}");
    assert!(errs[0].key.starts_with("policy"), "{shown}");
    assert!(shown.contains("rate_limitz"), "{shown}");
    assert!(errs[0].line > 1, "{shown}");
}

#[test]
fn bad_agent_id_is_reported() {
    let errs = errors_of(&good_manifest().replace("id: test-agent", "id: Test_Agent"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "agent.id");
    assert_eq!((errs[0].line, errs[0].col), (4, 3));
}

#[test]
fn undefined_connector_reference_is_reported() {
    let errs = errors_of(&good_manifest().replace("allow: [shop]", "allow: [shop, bank]"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "policy.connectors.allow[1]");
    assert!(errs[0].message.contains("\"bank\""));
    assert!(errs[0].message.contains("not defined"));
}

#[test]
fn missing_issuer_key_file_is_reported() {
    let text = good_manifest();
    let start = text.find("      public_key: |").unwrap();
    let end = text.find("connectors:").unwrap();
    let text = format!("{}      public_key_file: keys/nope.pub.pem\n{}", &text[..start], &text[end..]);
    let errs = errors_of(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "capability.issuers[0].public_key_file");
    assert!(errs[0].message.contains("nope.pub.pem"), "{}", errs[0]);
}

#[test]
fn invalid_rate_string_is_reported() {
    let errs = errors_of(&good_manifest().replace("rate: 10/s", "rate: ten per second"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "policy.rate_limits[0].rate");
    assert!(errs[0].message.contains("invalid rate"));
}

#[test]
fn missing_credential_is_a_warning_for_check_and_run_alike() {
    let text = good_manifest().replace(
        "    routes:\n",
        "    credentials:\n      - header: Authorization\n        value: \"Bearer ${env:UAPK_TEST_SURELY_UNSET}\"\n    routes:\n",
    );
    assert!(errors_of(&text).is_empty(), "a missing credential source is not an error");
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.yaml", &text);
    for strictness in [Strictness::Check, Strictness::Run] {
        let (m, warnings) = load_manifest(&p, strictness).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(warnings.len(), 1, "{strictness:?}: {warnings:?}");
        assert_eq!(warnings[0].key, "connectors[0].credentials[0].value");
        assert!(warnings[0].message.contains("UAPK_TEST_SURELY_UNSET"), "{}", warnings[0].message);
        assert!(warnings[0].message.contains("unavailable"), "{}", warnings[0].message);
        let err = m.connector("shop").unwrap().credentials.as_ref().unwrap_err();
        assert!(err.contains("UAPK_TEST_SURELY_UNSET"), "{err}");
    }
}

#[test]
fn missing_credential_file_is_a_warning_for_check_and_run_alike() {
    let dir = tempfile::tempdir().unwrap();
    let text = good_manifest().replace(
        "    routes:\n",
        "    credentials:\n      - header: Authorization\n        value: \"Bearer ${file:secrets/absent.key}\"\n    routes:\n",
    );
    let p = write(dir.path(), "m.yaml", &text);
    for strictness in [Strictness::Check, Strictness::Run] {
        let (m, warnings) = load_manifest(&p, strictness).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(warnings.len(), 1, "{strictness:?}: {warnings:?}");
        assert!(m.connector("shop").unwrap().credentials.is_err());
    }
}

#[test]
fn a_credential_template_that_can_never_resolve_is_an_error_for_check_and_run() {
    for bad in ["${vault:stripe}", "Bearer ${file:x"] {
        let text = good_manifest().replace(
            "    routes:\n",
            &format!("    credentials:\n      - header: Authorization\n        value: \"{bad}\"\n    routes:\n"),
        );
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.yaml", &text);
        for strictness in [Strictness::Check, Strictness::Run] {
            let Err(Diagnostics(errs)) = load_manifest(&p, strictness) else { panic!("{bad} accepted") };
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].key, "connectors[0].credentials[0].value");
        }
    }
}

#[test]
fn credential_from_file_is_resolved_and_marked_sensitive() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "s3cr3t\n");
    let text = good_manifest().replace(
        "    routes:\n",
        "    credentials:\n      - header: Authorization\n        value: \"Bearer ${file:secret}\"\n    routes:\n",
    );
    let p = write(dir.path(), "m.yaml", &text);
    let (m, _) = load_manifest(&p, Strictness::Check).unwrap();
    let creds = m.connector("shop").unwrap().credentials.as_ref().unwrap();
    assert_eq!(creds[0].1, "Bearer s3cr3t");
    assert!(creds[0].1.is_sensitive());
    assert!(!format!("{m:?}").contains("s3cr3t"), "Debug output must not show secrets");
}

#[test]
fn several_errors_are_all_reported() {
    let text = good_manifest().replace("id: test-agent", "id: X").replace("rate: 10/s", "rate: 0/s");
    let errs = errors_of(&text);
    assert_eq!(errs.len(), 2, "{errs:?}");
}

#[test]
fn duplicate_agents_in_a_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &good_manifest());
    write(dir.path(), "b.yaml", &good_manifest());
    let err = load_policies(dir.path(), Strictness::Check).unwrap_err();
    assert!(err.to_string().contains("already defined"), "{err}");
}

#[test]
fn configmap_layout_is_read_through_the_top_level_links() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("..2026_11_24");
    std::fs::create_dir(&data).unwrap();
    write(&data, "agent.yaml", &good_manifest());
    std::os::unix::fs::symlink("..2026_11_24", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/agent.yaml", dir.path().join("agent.yaml")).unwrap();
    let set = load_policies(dir.path(), Strictness::Check).unwrap();
    assert_eq!(set.manifests.len(), 1);
}

#[test]
fn shipped_example_policies_pass_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let set = load_policies(&dir, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    for id in ["payments-agent", "support-agent", "llm-agent"] {
        assert!(set.get(id).is_some(), "missing example {id}");
    }
}

#[test]
fn gateway_defaults_and_errors() {
    let cfg = load_gateway(None).unwrap();
    assert_eq!(cfg.proxy_listener.to_string(), "127.0.0.1:15080");
    assert_eq!(cfg.admin_listener.to_string(), "127.0.0.1:15021");
    assert_eq!(cfg.audit.path, Path::new("./data").join("audit.redb"));
    assert_eq!(cfg.audit.durability, AuditDurability::Sync);
    assert_eq!(cfg.limits.max_body_bytes, 10_485_760);
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "g.yaml", "listeners:\n  proxy: nowhere\naudit:\n  durability: sometimes\n");
    let errs = load_gateway(Some(&p)).unwrap_err().0;
    let keys: Vec<_> = errs.iter().map(|d| d.key.as_str()).collect();
    assert!(keys.contains(&"listeners.proxy") && keys.contains(&"audit.durability"), "{errs:?}");
    assert_eq!((errs.iter().find(|d| d.key == "audit.durability").unwrap().line), 4);
}

#[test]
fn hash_before_forward_defaults_to_64_kib_and_stays_within_max_body_bytes() {
    assert_eq!(load_gateway(None).unwrap().limits.hash_before_forward, 65_536);
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "g.yaml", "limits:\n  hash_before_forward: 0\n");
    assert_eq!(load_gateway(Some(&p)).unwrap().limits.hash_before_forward, 0, "0 streams every body");
    let p = write(dir.path(), "g.yaml", "limits:\n  max_body_bytes: 1000\n  hash_before_forward: 1001\n");
    let errs = load_gateway(Some(&p)).unwrap_err().0;
    assert!(errs.iter().any(|d| d.key == "limits.hash_before_forward"), "{errs:?}");
    let p = write(dir.path(), "g.yaml", "limits:\n  max_body_bytes: 1024\n");
    assert_eq!(load_gateway(Some(&p)).unwrap().limits.hash_before_forward, 1024, "the default follows a smaller max");
    let p = write(dir.path(), "g.yaml", "limits:\n  hash_before_forward: -1\n");
    assert!(load_gateway(Some(&p)).is_err(), "not a byte count");
}

#[test]
fn connection_and_refusal_limits_have_defaults_and_are_validated() {
    let cfg = load_gateway(None).unwrap();
    let l = &cfg.limits;
    assert_eq!(l.idle_timeout, std::time::Duration::from_secs(60));
    assert_eq!(l.header_read_timeout, std::time::Duration::from_secs(10));
    assert_eq!(l.tls_handshake_timeout, std::time::Duration::from_secs(10));
    assert_eq!(l.tunnel_idle_timeout, std::time::Duration::from_secs(300));
    assert_eq!(l.max_connections, 4096);
    assert_eq!(l.max_in_flight_per_agent, None, "half of max_connections as applied");
    assert_eq!((l.refusals_per_second, l.refusals_burst), (50.0, 100));
    assert_eq!(cfg.admin_max_connections, 256);

    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "g.yaml",
        "admin:\n  max_connections: 8\nlimits:\n  idle_timeout: 2s\n  tunnel_idle_timeout: 500ms\n  refusals_per_agent: 600/m\n  refusals_burst: 7\n  max_in_flight_per_agent: 3\n",
    );
    let cfg = load_gateway(Some(&p)).unwrap();
    assert_eq!(cfg.limits.max_in_flight_per_agent, Some(3));
    assert_eq!(cfg.admin_max_connections, 8);
    assert_eq!(cfg.limits.idle_timeout, std::time::Duration::from_secs(2));
    assert_eq!(cfg.limits.tunnel_idle_timeout, std::time::Duration::from_millis(500));
    assert_eq!((cfg.limits.refusals_per_second, cfg.limits.refusals_burst), (10.0, 7));

    let p = write(
        dir.path(),
        "bad.yaml",
        "admin:\n  max_connections: 0\nlimits:\n  idle_timeout: 0s\n  tls_handshake_timeout: soon\n  refusals_per_agent: lots\n  refusals_burst: 0\n  max_connections: 0\n  max_in_flight_per_agent: 0\n",
    );
    let errs = load_gateway(Some(&p)).unwrap_err().0;
    let keys: Vec<_> = errs.iter().map(|d| d.key.as_str()).collect();
    for k in [
        "admin.max_connections",
        "limits.idle_timeout",
        "limits.tls_handshake_timeout",
        "limits.refusals_per_agent",
        "limits.refusals_burst",
        "limits.max_connections",
        "limits.max_in_flight_per_agent",
    ] {
        assert!(keys.contains(&k), "{k} not reported: {errs:?}");
    }
}

#[test]
fn form_and_value_sources_load() {
    let text = good_manifest().replace(
        "          order: {{ path: order }}".replace("{{", "{").replace("}}", "}").as_str(),
        "          order: { path: order }\n          currency: { value: USD }\n",
    );
    let text = text.replace("amount: { json: /amount, scale: 2 }", "amount: { form: \"metadata[amount]\", scale: 2 }");
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.yaml", &text);
    let (m, _) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    let r = &m.connector("shop").unwrap().routes[0];
    let source = |n: &str| r.params.iter().find(|p| p.name == n).map(|p| p.source.clone());
    assert_eq!(source("amount"), Some(ParamSource::Form("metadata[amount]".into())));
    assert_eq!(source("currency"), Some(ParamSource::Value("USD".into())));
    assert_eq!(r.body_format(), Some(BodyFormat::Form));
}

#[test]
fn param_sources_are_exactly_one_and_a_body_is_json_or_form() {
    let errs = errors_of(&good_manifest().replace("{ json: /amount, scale: 2 }", "{ json: /amount, form: amount }"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].message.contains("exactly one of json, form, header, query, path, value"), "{}", errs[0]);
    let errs = errors_of(&good_manifest().replace("order: { path: order }", "order: { form: order }"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "connectors[0].routes[0].params");
    assert!(errs[0].message.contains("not both"), "{}", errs[0]);
    let errs = errors_of(&good_manifest().replace("order: { path: order }", "order: { value: \" \" }"));
    assert_eq!(errs[0].key, "connectors[0].routes[0].params.order.value");
}

#[test]
fn param_constraints_are_validated() {
    let with = |block: &str| good_manifest().replace("  rate_limits:", &format!("  params:\n{block}  rate_limits:"));
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.yaml",
        &with("    order: { allow: [A1, \" b2 \"], deny: [x] }\n    amount: { min: \"0.50\", max: \"500\" }\n"),
    );
    let (m, warnings) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let order = &m.policy.params["order"];
    assert_eq!(order.values.allow, vec!["A1".to_string(), "b2".to_string()]);
    assert!(order.values.allows_value("a1") && !order.values.allows_value("x"));
    assert_eq!(m.policy.params["amount"].max, Some("500".parse().unwrap()));

    let errs = errors_of(&with("    order: { alow: [a] }\n"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].key.starts_with("policy.params"), "{}", errs[0]);
    assert!(errs[0].to_string().contains("alow"), "{}", errs[0]);

    let errs = errors_of(&with("    amount: { min: \"1,5\", max: \"ten\" }\n"));
    let keys: Vec<_> = errs.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(keys, vec!["policy.params.amount.min", "policy.params.amount.max"], "{errs:?}");
    assert!(errs[0].line > 20, "{}", errs[0]);

    let errs = errors_of(&with("    amount: { min: \"5\", max: \"1\" }\n"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].message.contains("above max"), "{}", errs[0]);

    let errs = errors_of(&with("    amount: {}\n"));
    assert!(errs[0].message.contains("at least one of"), "{errs:?}");

    // A constraint on a param no route declares is legal but never applies: a warning.
    let p = write(dir.path(), "w.yaml", &with("    model: { allow: [gpt-4o-mini] }\n"));
    let (_, warnings) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].key, "policy.params.model");
}

#[test]
fn money_rules_need_a_route_that_reads_an_amount() {
    let no_amount = good_manifest().replace("          amount: { json: /amount, scale: 2 }\n", "");
    let with = |text: &str, block: &str| text.replace("  rate_limits:", &format!("{block}  rate_limits:"));
    let text = with(&no_amount, "  approval:\n    amount_above: { USD: \"50\" }\n");
    let line = text.lines().position(|l| l.contains("amount_above")).unwrap() + 1;
    let errs = errors_of(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "policy.approval.amount_above");
    assert_eq!((errs[0].line, errs[0].col), (line, 5), "{}", errs[0]);
    assert!(errs[0].to_string().contains(&format!("m.yaml:{line}:5: policy.approval.amount_above: ")), "{}", errs[0]);
    let errs = errors_of(&with(&no_amount, "  budgets:\n    - window: day\n      max_spend: { USD: \"50\" }\n"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "policy.budgets[0].max_spend");
    // Budgets that only count actions need no amount; with an amount route both rules load.
    assert!(errors_of(&with(&no_amount, "  budgets:\n    - window: day\n      max_actions: 5\n")).is_empty());
    assert!(errors_of(&with(&good_manifest(), "  approval:\n    amount_above: { USD: \"50\" }\n")).is_empty());
}

#[test]
fn hosts_compare_without_a_trailing_dot() {
    let text = good_manifest().replace(
        "    base_url: http://127.0.0.1:9999\n",
        "    base_url: http://Shop.Example.com.:9999\n    hosts: [API.example.com.]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.yaml", &text);
    let (m, _) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    let c = m.connector("shop").unwrap();
    assert_eq!(c.hosts, vec!["api.example.com".to_string()]);
    assert_eq!(c.base_url.as_ref().unwrap().host, "shop.example.com");
    assert!(c.matches_host("api.example.com.") && c.matches_host("API.EXAMPLE.COM"));
    assert!(!c.matches_host("api.example.com..") && !c.matches_host("."));
}

#[test]
fn demo_mode_points_base_url_connectors_at_the_local_upstream_and_nothing_else() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let set = load_policies(&dir, Strictness::Run).unwrap_or_else(|e| panic!("{e}"));
    let addr: std::net::SocketAddr = "127.0.0.1:15090".parse().unwrap();
    for (id, m) in &set.manifests {
        let mut m = crate::config::parse_manifest(&m.source, &std::fs::read(&m.source).unwrap(), &dir, Strictness::Run)
            .unwrap_or_else(|e| panic!("{e}"))
            .0;
        let before: Vec<(String, String)> = m
            .connectors
            .iter()
            .map(|c| (c.name.clone(), c.base_url.as_ref().map(|b| b.path_prefix.clone()).unwrap_or_default()))
            .collect();
        crate::config::point_at_demo_upstream(&mut m, addr);
        for (c, (name, prefix)) in m.connectors.iter().zip(before) {
            let b = c.base_url.as_ref().unwrap_or_else(|| panic!("{id}: {name} has no base_url"));
            assert_eq!((b.scheme, b.host.as_str(), b.port), (Scheme::Http, "127.0.0.1", 15090), "{id}: {name}");
            assert_eq!(b.path_prefix, prefix, "{id}: {name} keeps its path prefix");
            assert_eq!(c.hosts, vec!["127.0.0.1".to_string()], "{id}: {name}: the real host is no longer reachable");
            assert_eq!(c.ports, vec![15090]);
            assert!(c.credentials.is_ok(), "{id}: {name} keeps its credentials");
        }
    }
    assert!(crate::config::demo_upstream().is_none(), "demo mode is never on unless `run --demo` turns it on");
}

#[test]
fn check_warns_about_rules_nothing_can_trigger_and_connectors_sharing_a_host() {
    let dir = tempfile::tempdir().unwrap();
    let text = good_manifest()
        .replace(
            "policy:\n",
            "  - name: shop2\n    base_url: http://127.0.0.1:9999/v2\n    routes:\n      - { path: /x, action: order.read }\npolicy:\n  approval:\n    action_types: [order.create, order.refund]\n",
        )
        .replace("allow: [shop]", "allow: [shop, shop2]");
    let p = write(dir.path(), "m.yaml", &text);
    let (_, warnings) = load_manifest(&p, Strictness::Check).unwrap();
    let keys: Vec<&str> = warnings.iter().map(|w| w.key.as_str()).collect();
    assert!(keys.contains(&"policy.approval.action_types[1]"), "{warnings:?}");
    assert!(!keys.contains(&"policy.approval.action_types[0]"), "order.create has a route: {warnings:?}");
    let shared = warnings.iter().find(|w| w.key == "connectors[1].hosts").expect("the shared host is warned about");
    assert!(shared.message.contains("127.0.0.1:9999") && shared.message.contains("connectors[0]"), "{shared:?}");
}

#[test]
fn usage_and_max_tokens_are_validated() {
    let budget = |text: &str, b: &str| {
        text.replace("  rate_limits:", &format!("  budgets:\n    - window: day\n{b}  rate_limits:"))
    };
    let usage = |u: &str| {
        good_manifest().replace(
            "    base_url: http://127.0.0.1:9999\n",
            &format!("    base_url: http://127.0.0.1:9999\n    usage: {u}\n"),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    for (u, want) in [("openai", UsageFormat::OpenAi), ("anthropic", UsageFormat::Anthropic)] {
        let p = write(dir.path(), "u.yaml", &budget(&usage(u), "      max_tokens: 5000\n"));
        let (m, warnings) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(m.connector("shop").unwrap().usage, Some(want));
        assert_eq!(m.policy.budgets[0].max_tokens, Some(5000));
    }
    let errs = errors_of(&usage("gemini"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "connectors[0].usage");
    assert!(errs[0].message.contains("openai, anthropic"), "{}", errs[0]);
    // max_tokens is a positive integer.
    for bad in ["0", "-5", "1.5", "lots"] {
        let errs = errors_of(&budget(&usage("openai"), &format!("      max_tokens: {bad}\n")));
        assert!(!errs.is_empty(), "max_tokens: {bad} loaded");
        assert!(errs[0].to_string().contains("max_tokens"), "{bad}: {}", errs[0]);
    }
    // A token budget alone is a budget.
    assert!(errors_of(&budget(&usage("openai"), "      max_tokens: 1\n")).is_empty());
    // Without a usage connector no token is ever counted: a warning.
    let p = write(dir.path(), "w.yaml", &budget(&good_manifest(), "      max_tokens: 5000\n"));
    let (_, warnings) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].key, "policy.budgets[0].max_tokens");
}

#[test]
fn usage_estimate_and_usage_drain_timeout_have_defaults_and_are_validated() {
    assert_eq!(load_gateway(None).unwrap().limits.usage_drain_timeout, std::time::Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "g.yaml", "limits:\n  usage_drain_timeout: 1500ms\n");
    assert_eq!(load_gateway(Some(&p)).unwrap().limits.usage_drain_timeout, std::time::Duration::from_millis(1500));
    let p = write(dir.path(), "bad.yaml", "limits:\n  usage_drain_timeout: a while\n");
    let errs = load_gateway(Some(&p)).unwrap_err().0;
    assert_eq!(errs[0].key, "limits.usage_drain_timeout", "{errs:?}");

    let with = |extra: &str| {
        good_manifest()
            .replace("    base_url: http://127.0.0.1:9999\n", &format!("    base_url: http://127.0.0.1:9999\n{extra}"))
    };
    let p = write(dir.path(), "d.yaml", &with("    usage: openai\n"));
    let (m, _) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.connector("shop").unwrap().usage_estimate, 4096);
    let p = write(dir.path(), "e.yaml", &with("    usage: anthropic\n    usage_estimate: 1024\n"));
    let (m, warnings) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(m.connector("shop").unwrap().usage_estimate, 1024);
    // 0 would charge nothing for a call whose usage cannot be read.
    for bad in ["0", "-1", "9007199254740993", "many"] {
        let errs = errors_of(&with(&format!("    usage: openai\n    usage_estimate: {bad}\n")));
        assert!(errs.iter().any(|e| e.to_string().contains("usage_estimate")), "usage_estimate: {bad}: {errs:?}");
    }
    // Without usage it does nothing: a warning.
    let p = write(dir.path(), "f.yaml", &with("    usage_estimate: 100\n"));
    let (_, warnings) = load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(warnings[0].key, "connectors[0].usage_estimate", "{warnings:?}");
}

#[test]
fn capability_leeway_defaults_to_60s_and_takes_whole_seconds_up_to_an_hour() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = load_manifest(&write(dir.path(), "m.yaml", &good_manifest()), Strictness::Check).unwrap();
    assert_eq!(m.capability.leeway, std::time::Duration::from_secs(60));
    let with = |l: &str| good_manifest().replace("capability:\n", &format!("capability:\n  leeway: {l}\n"));
    let (m, _) = load_manifest(&write(dir.path(), "z.yaml", &with("0s")), Strictness::Check).unwrap();
    assert_eq!(m.capability.leeway, std::time::Duration::ZERO);
    for bad in ["2h", "500ms", "soon"] {
        let errs = errors_of(&with(bad));
        assert!(errs.iter().any(|d| d.key == "capability.leeway"), "{bad}: {errs:?}");
    }
}
