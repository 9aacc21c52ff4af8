//! The README walkthrough, replayed: every `sh` block of its "Five-minute walkthrough" section
//! is run in order by one bash, in a fresh directory holding copies of `policies/` and
//! `examples/`, with the real `uapk-gateway` binary first on the `PATH` (so `cargo install --path
//! .`, which would put it there, is skipped). What each command prints on stdout is compared with
//! the `#>` lines that follow it in the README: line for line, where `…` matches any text (ids,
//! record indexes, hashes, times); a command followed by no `#>` line must print nothing.
//!
//! So that it can run beside other gateways on the machine, the README's ports (15080, 15021,
//! 15090) are replaced by free ones everywhere: in the commands, the copied
//! `examples/gateway.yaml`, and through `UAPK_DEMO_UPSTREAM` (read by `demo-upstream --listen` and
//! `run --demo-upstream`).

use crate::support::{bin, copy_dir, free_port};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECTION: &str = "## Five-minute walkthrough";
const STEP_MARK: &str = "@@walkthrough-step ";

/// One command of the walkthrough and the lines the README says it prints.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The `sh` blocks of the walkthrough section, split into commands (with their `\`
/// continuation lines) and the `#>` lines after each.
fn steps(readme: &str) -> Vec<Step> {
    let start = readme.find(SECTION).expect("the README has a walkthrough section");
    let rest = &readme[start + SECTION.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    let mut continuing = false;
    for line in section.lines() {
        if !in_block {
            in_block = line.trim_end() == "```sh";
            continue;
        }
        if line.starts_with("```") {
            in_block = false;
            continue;
        }
        if continuing {
            let step = steps.last_mut().expect("a command");
            step.command.push('\n');
            step.command.push_str(line);
            continuing = line.ends_with('\\');
        } else if let Some(out) = line.strip_prefix("#>") {
            let step = steps.last_mut().expect("#> lines follow a command");
            step.expected.push(out.strip_prefix(' ').unwrap_or(out).to_string());
        } else if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        } else {
            steps.push(Step { command: line.to_string(), expected: Vec::new() });
            continuing = line.ends_with('\\');
        }
    }
    steps
}

/// Whether `actual` is `pattern` with each `…` standing for any text.
fn matches(pattern: &str, actual: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern == actual;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !actual.starts_with(first) || actual.len() < first.len() + last.len() || !actual.ends_with(last) {
        return false;
    }
    let mut rest = &actual[first.len()..actual.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// The shipped `policies/` and `examples/` copied into a fresh directory, and free loopback
/// ports for the proxy and admin listeners and the demo upstream.
struct DemoDir {
    dir: tempfile::TempDir,
    proxy: u16,
    admin: u16,
    demo: u16,
}

impl DemoDir {
    fn new() -> DemoDir {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&root.join("policies"), &dir.path().join("policies"));
        copy_dir(&root.join("examples"), &dir.path().join("examples"));
        let (proxy, admin, demo) = (free_port(), free_port(), free_port());
        DemoDir { dir, proxy, admin, demo }
    }

    /// A gateway.yaml of its own that puts the listeners on the free ports.
    fn write_config(&self) {
        let yaml = format!("listeners: {{ proxy: 127.0.0.1:{}, admin: 127.0.0.1:{} }}\n", self.proxy, self.admin);
        std::fs::write(self.path().join("gateway.yaml"), yaml).unwrap();
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A token for `sub` minted with the example issuer key, valid for `ttl`.
    fn token(&self, sub: &str, ttl: &str) -> String {
        let out = Command::new(bin())
            .args(["token", "mint", "--issuer-key", "examples/keys/demo-issuer.pem", "--iss", "platform"])
            .args(["--sub", sub, "--ttl", ttl])
            .current_dir(self.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// `/readyz` of the gateway, once it answers (curl retries for up to 30 s).
    fn ready(&self) -> String {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin);
        curl(&["--retry", "30", "--retry-connrefused", "--retry-delay", "1", &url])
    }
}

/// What `curl -s args` printed.
fn curl(args: &[&str]) -> String {
    let o = Command::new("curl").arg("-s").args(args).output().expect("curl");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Kills the gateway and the demo upstream; what the demo upstream logged.
fn stop_demo(mut gateway: Child, mut upstream: Child) -> String {
    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = upstream.kill();
    upstream.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default()
}

#[test]
fn matcher_treats_the_ellipsis_as_any_text_and_nothing_else() {
    assert!(matches("ok: … entries verified; …", "ok: 17 entries verified; 9 checkpoints"));
    assert!(matches("{\"a\":…,\"b\":2}", "{\"a\":1,\"b\":2}"));
    assert!(!matches("{\"a\":…,\"b\":2}", "{\"a\":1,\"b\":3}"));
    assert!(!matches("ok: 3 manifest(s)", "ok: 2 manifest(s)"));
    assert!(!matches("x…y…z", "xzy"));
    assert!(matches("…", ""));
}

#[test]
fn the_readme_walkthrough_prints_what_it_shows() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let steps = steps(&readme);
    assert!(steps.len() > 10, "too few walkthrough commands found: {steps:?}");
    for must in ["demo-upstream", "run --demo", "/approve", "x-uapk-override", "verify --db", "verify --bundle"] {
        assert!(steps.iter().any(|s| s.command.contains(must)), "the walkthrough no longer runs {must}");
    }

    let d = DemoDir::new();
    let (dir, proxy, admin, demo) = (&d.dir, d.proxy, d.admin, d.demo);
    let ports = |s: &str| {
        s.replace("127.0.0.1:15080", &format!("127.0.0.1:{proxy}"))
            .replace("127.0.0.1:15021", &format!("127.0.0.1:{admin}"))
            .replace("127.0.0.1:15090", &format!("127.0.0.1:{demo}"))
    };
    let example = std::fs::read_to_string(root.join("examples/gateway.yaml")).unwrap();
    std::fs::write(dir.path().join("examples/gateway.yaml"), ports(&example)).unwrap();

    // One script: each command, then a marker line, so the output splits per command. Every
    // background job is ended when the script exits, whatever happened.
    let mut script = String::from("trap 'kill $(jobs -p) 2>/dev/null' EXIT\n");
    for (i, s) in steps.iter().enumerate() {
        if s.command.trim_start().starts_with("cargo install") {
            continue;
        }
        script.push_str(&ports(&s.command));
        script.push_str(&format!("\nprintf '\\n{STEP_MARK}{i}\\n'\n"));
    }
    let bin = PathBuf::from(bin());
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("UAPK_DEMO_UPSTREAM", format!("127.0.0.1:{demo}"))
        .env_remove("UAPK_ADMIN_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let gateway_log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();

    // Split stdout at the markers: segment i is what command i printed.
    let mut printed: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
    let mut current: Vec<String> = Vec::new();
    for line in stdout.lines() {
        if let Some(i) = line.strip_prefix(STEP_MARK) {
            printed.insert(i.parse().unwrap(), std::mem::take(&mut current));
        } else if !line.trim().is_empty() {
            current.push(line.to_string());
        }
    }
    let mut problems = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        if s.command.trim_start().starts_with("cargo install") {
            continue;
        }
        let Some(got) = printed.get(&i) else {
            problems.push(format!("command {i} never finished: {}", s.command));
            break;
        };
        let expected: Vec<String> = s.expected.iter().map(|e| ports(e)).collect();
        let same = got.len() == expected.len() && expected.iter().zip(got).all(|(e, g)| matches(e, g));
        if !same {
            problems.push(format!(
                "command {i}: {}\n  README shows:\n    {}\n  it printed:\n    {}",
                s.command,
                expected.join("\n    "),
                got.join("\n    ")
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n--- stderr:\n{stderr}\n--- gateway.log (tail):\n{}",
        problems.join("\n"),
        gateway_log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    // The admin key is readable by its owner only, in the (git-ignored) data directory.
    use std::os::unix::fs::PermissionsExt;
    let key_file = dir.path().join("data/admin-key.txt");
    let mode = std::fs::metadata(&key_file).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "{}", key_file.display());
    assert!(!dir.path().join("admin-key.txt").exists());
}

/// Dotted paths of every leaf key of a YAML document.
fn leaf_keys(v: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) if !m.is_empty() => {
            for (k, v) in m {
                let k = k.as_str().expect("string keys");
                let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                leaf_keys(v, &path, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn example_gateway_yaml_is_the_defaults_and_every_key_is_documented() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("examples/gateway.yaml");
    let loaded = uapk_gateway::config::load_gateway(Some(&path)).unwrap_or_else(|e| panic!("{e}"));
    let defaults = uapk_gateway::config::load_gateway(None).unwrap_or_else(|e| panic!("{e}"));
    // The example names its log instead of taking the host's name; everything else is the default.
    let without_origin = |c: &uapk_gateway::config::GatewayConfig| {
        let mut c = c.clone();
        c.audit.origin = String::new();
        format!("{c:?}")
    };
    assert_eq!(without_origin(&loaded), without_origin(&defaults), "examples/gateway.yaml must show the defaults");
    assert_eq!(loaded.audit.origin, "uapk-gateway/local");

    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut keys = Vec::new();
    leaf_keys(&doc, "", &mut keys);
    assert!(keys.len() >= 25, "{keys:?}");
    let reference = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    let missing: Vec<&String> = keys.iter().filter(|k| !reference.contains(&format!("`{k}`"))).collect();
    assert!(missing.is_empty(), "docs/configuration.md does not document {missing:?}");
    // And every key the reference documents is one the example (so the code) has.
    for line in reference.lines().filter(|l| l.starts_with("| `")) {
        let key = line.trim_start_matches("| `").split('`').next().unwrap();
        assert!(
            keys.iter().any(|k| k == key),
            "docs/configuration.md documents {key}, which examples/gateway.yaml lacks"
        );
    }
}

/// Key names of a manifest (not the user-chosen names under params and money maps).
fn manifest_keys(v: &serde_yaml::Value, parent: &str, out: &mut std::collections::BTreeSet<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            let user_named = ["params", "amount_caps", "amount_above", "max_spend"].contains(&parent);
            for (k, v) in m {
                let k = k.as_str().expect("string keys");
                if !user_named {
                    out.insert(k.to_string());
                }
                manifest_keys(v, if user_named { "" } else { k }, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| manifest_keys(v, parent, out)),
        _ => {}
    }
}

#[test]
fn every_key_the_example_manifests_use_is_in_the_manifest_reference() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let reference = std::fs::read_to_string(root.join("docs/manifest.md")).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    for f in uapk_gateway::config::manifest_files(&root.join("policies")).unwrap() {
        let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        manifest_keys(&doc, "", &mut keys);
    }
    assert!(keys.len() > 30, "{keys:?}");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !reference.contains(&format!("`{k}`")) && !reference.contains(&format!("\n{k}:")))
        .collect();
    assert!(missing.is_empty(), "docs/manifest.md does not document {missing:?}");
}

/// What the walkthrough's last step says: a credential missing from `policies/secrets/` is a
/// warning for `check` (exit 0) as for `run`, whose connector then denies `connector_unavailable`
/// and forwards nothing.
#[test]
fn check_and_run_agree_on_a_missing_credential() {
    let d = DemoDir::new();
    d.write_config();
    std::fs::remove_file(d.path().join("policies/secrets/stripe.key")).unwrap();

    let check = Command::new(bin()).args(["check", "-c", "gateway.yaml"]).current_dir(d.path()).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert_eq!(check.status.code(), Some(0), "{out}{err}");
    assert!(out.starts_with("ok: 3 manifest(s)"), "{out}");
    assert!(
        err.contains("warning: ")
            && err.contains("payments-agent.yaml:")
            && err.contains("connectors[0].credentials[0].value")
            && err.contains("connector \"stripe\" is unavailable"),
        "{err}"
    );

    // The same files under `run --demo`: ready, and the stripe connector refuses.
    let demo = format!("127.0.0.1:{}", d.demo);
    let upstream = Command::new(bin())
        .args(["demo-upstream", "--listen", &demo])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let gateway = Command::new(bin())
        .args(["run", "--demo", "--demo-upstream", &demo, "-c", "gateway.yaml"])
        .current_dir(d.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let token = d.token("payments-agent", "1h");
    let ready = d.ready();
    let refund = curl(&[
        "-X",
        "POST",
        &format!("http://127.0.0.1:{}/stripe/v1/refunds", d.proxy),
        "-H",
        &format!("x-uapk-capability: {token}"),
        "-H",
        "x-country: US",
        "-d",
        "amount=1500",
        "-d",
        "currency=usd",
        "-d",
        "customer=cus_123",
    ]);
    let upstream_log = stop_demo(gateway, upstream);
    assert!(ready.contains("\"ready\":true"), "{ready}");
    let v: serde_json::Value = serde_json::from_str(&refund).unwrap_or_else(|e| panic!("{e}: {refund}"));
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(v["reasons"][0]["code"], "connector_unavailable", "{v}");
    assert!(!upstream_log.contains("/v1/refunds"), "forwarded unauthenticated: {upstream_log}");
}

/// The LLM example through `run --demo`: a chat completion answers with its `usage`, and a
/// streamed one arrives as server-sent events ending in a usage chunk and `[DONE]`; a model off
/// the manifest's list never reaches the demo upstream.
#[test]
fn the_llm_example_works_offline_through_the_demo_upstream() {
    let d = DemoDir::new();
    d.write_config();
    let demo = format!("127.0.0.1:{}", d.demo);
    let upstream = Command::new(bin())
        .args(["demo-upstream"])
        .env("UAPK_DEMO_UPSTREAM", &demo)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let gateway = Command::new(bin())
        .args(["run", "--demo", "-c", "gateway.yaml"])
        .env("UAPK_DEMO_UPSTREAM", &demo)
        .current_dir(d.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let token = d.token("llm-agent", "30m");
    let ready = d.ready();
    let url = format!("http://127.0.0.1:{}/openai/v1/chat/completions", d.proxy);
    let auth = format!("x-uapk-capability: {token}");
    let chat = |body: &str| {
        curl(&[
            "-X",
            "POST",
            &url,
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-H",
            "authorization: Bearer agent-own",
            "-d",
            body,
        ])
    };
    let plain = chat(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"say hello"}]}"#);
    let streamed = chat(r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"say hello"}]}"#);
    let refused = chat(r#"{"model":"gpt-5-unlisted","messages":[{"role":"user","content":"say hello"}]}"#);
    let upstream_log = stop_demo(gateway, upstream);

    assert!(ready.contains("\"ready\":true"), "{ready}");
    let v: serde_json::Value = serde_json::from_str(&plain).unwrap_or_else(|e| panic!("{e}: {plain}"));
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 2, "{v}");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64(),
        Some(2 + v["usage"]["completion_tokens"].as_u64().unwrap_or(0)),
        "{v}"
    );
    // The gateway injected the connector's key (redacted in the echo) in place of the agent's.
    assert_eq!(v["demo_echo"]["headers"]["authorization"], "[redacted]", "{v}");
    assert!(!plain.contains("agent-own") && !plain.contains("uapk-demo-not-a-real-key"), "{plain}");

    let events: Vec<&str> = streamed.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert_eq!(events.last().map(|e| e.trim()), Some("data: [DONE]"), "{streamed}");
    let usage: serde_json::Value =
        serde_json::from_str(events[events.len() - 2].trim().strip_prefix("data: ").unwrap_or("")).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 2, "{usage}");

    let r: serde_json::Value = serde_json::from_str(&refused).unwrap_or_else(|e| panic!("{e}: {refused}"));
    assert_eq!(r["decision"], "deny", "{r}");
    assert_eq!(r["reasons"][0]["code"], "param_not_allowed", "{r}");
    assert_eq!(upstream_log.matches("/v1/chat/completions").count(), 2, "{upstream_log}");
}
