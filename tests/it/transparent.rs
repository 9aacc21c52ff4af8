//! Transparent mode for real: two network namespaces joined by a veth pair, with IPv4 and IPv6
//! addresses. The agent namespace runs the gateway (as the proxy UID) with the rules
//! `init-iptables` installs; an unmodified curl running as another UID is redirected, decided and
//! recorded — over IPv4 and IPv6, and on TCP port 53 too — while its UDP (QUIC) never leaves and
//! its DNS reaches only the resolver. The same clients as the proxy UID are not redirected. The
//! upstream namespace serves HTTP (ports 80 and 53) and HTTPS, listens for UDP on 443 and 53, and
//! answers DNS on the resolver addresses; it writes everything that reaches it to a log.
//!
//! Needs root, `ip`, `iptables`, `ip6tables`, `setpriv`, `curl`, `openssl` and `python3`: it skips
//! with a message where they are missing, and `.ci/run` (root) installs them so it always runs
//! there.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const AGENT_UID: &str = "65534";
const PROXY_UID: &str = "1337";
/// Agent-side Python runs as other UIDs: use the system interpreter, not a per-user shim.
const PY: &str = "/usr/bin/python3";

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn sh_out(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Skips (outside CI) where the test cannot run; true when it can.
fn can_run() -> bool {
    let root = is_root();
    let missing: Vec<_> =
        ["ip", "iptables", "ip6tables", "setpriv", "curl", "openssl", PY].into_iter().filter(|c| !have(c)).collect();
    if !root || !missing.is_empty() {
        assert!(std::env::var_os("CI").is_none(), "CI must run the transparent-mode test: root and {missing:?} needed");
        eprintln!("SKIPPED transparent-mode test: needs root and {missing:?} (CI installs them and runs as root)");
        return false;
    }
    true
}

/// The namespaces and the processes in them; removed on drop, also when the test fails.
struct Netns {
    agent: String,
    upstream: String,
    children: Vec<Child>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.agent, &self.upstream] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

fn in_ns(ns: &str, uid: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "setpriv", &format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"]);
    c.args(args);
    c
}

fn curl(ns: &str, uid: &str, extra: &[&str], url: &str) -> (String, String) {
    let mut args = vec!["curl", "-g", "-s", "-m", "10", "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = in_ns(ns, uid, &args).env_remove("HTTPS_PROXY").env_remove("HTTP_PROXY").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_string(), body.to_string())
}

fn wait_port(ns: &str, port: u16) {
    for _ in 0..100 {
        let ss = Command::new("ip").args(["netns", "exec", ns, "ss", "-ltn"]).output().unwrap();
        if String::from_utf8_lossy(&ss.stdout).contains(&format!(":{port} ")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing listens on {port} in {ns}");
}

/// The upstream: HTTP on 80 and 53, HTTPS on 443 (all dual-stack), UDP on 443 and 53 of its main
/// addresses (recorded, never answered), and a DNS responder on the resolver addresses (answers
/// every A question with 10.201.0.2). Every request and datagram goes to the log.
const UPSTREAM_PY: &str = r#"
import http.server, json, socket, ssl, sys, threading
cert, key, log = sys.argv[1:4]
lock = threading.Lock()
def note(line):
    with lock:
        with open(log, "a") as f:
            f.write(line + "\n")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        note(f"http {self.server.server_address[1]} {self.path}")
        body = json.dumps({"ok": True, "path": self.path, "tls": isinstance(self.connection, ssl.SSLSocket)}).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
class Dual(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
def udp(addr, port, dns):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    def loop():
        while True:
            data, peer = s.recvfrom(2048)
            text = data.decode("latin-1")
            note(f"udp {addr} {port} " + (text if text.isprintable() else "hex:" + data.hex()))
            if dns and len(data) > 12:
                answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton("10.201.0.2")
                s.sendto(data[:2] + b"\x81\x80" + data[4:6] + b"\x00\x01\x00\x00\x00\x00" + data[12:] + answer, peer)
    threading.Thread(target=loop, daemon=True).start()
for addr, port, dns in [("10.201.0.53", 53, True), ("fd00:201::53", 53, True), ("10.201.0.2", 53, False),
                        ("fd00:201::2", 53, False), ("10.201.0.2", 443, False), ("fd00:201::2", 443, False)]:
    udp(addr, port, dns)
servers = [Dual(("::", 80), H), Dual(("::", 53), H), Dual(("::", 443), H)]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
servers[2].socket = ctx.wrap_socket(servers[2].socket, server_side=True)
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
note("ready")
threading.Event().wait()
"#;

/// The agent-side probe: `udp HOST PORT TEXT` sends one datagram and prints `sent` or
/// `refused ERRNO`; `dns HOST PORT` asks for api.test and prints `answer IP` or `noanswer`;
/// `ping HOST 0` sends an ICMP echo request from a ping socket and prints `reply` or `noreply`.
const PROBE_PY: &str = r#"
import socket, struct, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
v6 = ":" in host
if mode == "ping":
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM,
                      socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
else:
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
try:
    if mode == "ping":
        s.sendto(struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, 1) + b"exfil", (host, 0))
        data, _ = s.recvfrom(512)
        print("reply" if data[0] == (129 if v6 else 0) else "bad reply")
    elif mode == "udp":
        s.sendto(sys.argv[4].encode(), (host, port)); print("sent")
    else:
        q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x03api\x04test\x00\x00\x01\x00\x01"
        s.sendto(q, (host, port)); data, _ = s.recvfrom(512)
        print("answer " + socket.inet_ntoa(data[-4:]) if data[:2] == b"\x42\x42" else "bad answer")
except OSError as e:
    print({"udp": "refused", "dns": "noanswer", "ping": "noreply"}[mode], e.errno)
"#;

/// Two namespaces (agent `10.201.0.1`/`fd00:201::1`, upstream `10.201.0.2`/`fd00:201::2` plus
/// the resolver `10.201.0.53`/`fd00:201::53`) and the upstream serving in its own.
struct Lab {
    ns: Netns,
    dir: tempfile::TempDir,
}

impl Lab {
    fn start() -> Lab {
        let tag = &rand_hex()[..6];
        let ns = Netns { agent: format!("uapk-a-{tag}"), upstream: format!("uapk-u-{tag}"), children: Vec::new() };
        let (a, u) = (ns.agent.clone(), ns.upstream.clone());
        let (va, vu) = (format!("va{tag}"), format!("vu{tag}"));
        sh(&format!("ip netns add {a} && ip netns add {u}"));
        sh(&format!("ip link add {va} type veth peer name {vu}"));
        sh(&format!("ip link set {va} netns {a} && ip link set {vu} netns {u}"));
        sh(&format!("ip -n {a} addr add 10.201.0.1/24 dev {va} && ip -n {a} addr add fd00:201::1/64 dev {va} nodad"));
        sh(&format!("ip -n {a} link set {va} up && ip -n {a} link set lo up"));
        sh(&format!(
            "ip -n {u} addr add 10.201.0.2/24 dev {vu} && ip -n {u} addr add 10.201.0.53/24 dev {vu} \
             && ip -n {u} addr add fd00:201::2/64 dev {vu} nodad && ip -n {u} addr add fd00:201::53/64 dev {vu} nodad"
        ));
        sh(&format!("ip -n {u} link set {vu} up && ip -n {u} link set lo up"));
        std::fs::create_dir_all(format!("/etc/netns/{a}")).unwrap();
        std::fs::write(format!("/etc/netns/{a}/hosts"), "127.0.0.1 localhost\n10.201.0.2 api.test\n").unwrap();
        std::fs::write(format!("/etc/netns/{a}/resolv.conf"), "nameserver 10.201.0.53\nnameserver fd00:201::53\n")
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        sh(&format!(
            "cd {p} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout up-ca.key -out up-ca.pem -days 2 -subj /CN=test-up-ca 2>/dev/null \
             && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout up.key -out up.csr -subj /CN=api.test 2>/dev/null \
             && printf 'subjectAltName=DNS:api.test\\n' > ext && openssl x509 -req -in up.csr -CA up-ca.pem -CAkey up-ca.key -CAcreateserial -out up.pem -days 2 -extfile ext 2>/dev/null",
            p = d.display()
        ));
        std::fs::write(d.join("up.py"), UPSTREAM_PY).unwrap();
        std::fs::write(d.join("probe.py"), PROBE_PY).unwrap();
        let mut lab = Lab { ns, dir };
        let child = Command::new("ip")
            .args(["netns", "exec", &u, PY])
            .arg(d.join("up.py"))
            .arg(d.join("up.pem"))
            .arg(d.join("up.key"))
            .arg(lab.upstream_log_path())
            .spawn()
            .unwrap();
        lab.ns.children.push(child);
        for _ in 0..100 {
            if lab.upstream_log().contains("ready") {
                return lab;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the upstream did not start");
    }

    fn d(&self) -> &Path {
        self.dir.path()
    }

    fn upstream_log_path(&self) -> PathBuf {
        self.d().join("upstream.log")
    }

    /// Everything that reached the upstream namespace so far.
    fn upstream_log(&self) -> String {
        std::fs::read_to_string(self.upstream_log_path()).unwrap_or_default()
    }

    fn probe(&self, uid: &str, args: &[&str]) -> String {
        let probe = self.d().join("probe.py");
        let mut all = vec![PY, probe.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = in_ns(&self.ns.agent, uid, &all).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until `needle` reached the upstream (a control that must arrive).
    fn wait_upstream(&self, needle: &str) {
        for _ in 0..50 {
            if self.upstream_log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{needle} never reached the upstream:\n{}", self.upstream_log());
    }

    /// `init-iptables` as the init container runs it, in the agent namespace.
    fn init_iptables(&self, extra: &[&str], path: Option<&Path>) -> (bool, String, String) {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns.agent, bin(), "init-iptables", "--proxy-uid", PROXY_UID, "--port", "15001"]);
        c.args(extra);
        if let Some(p) = path {
            c.env("PATH", p);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts the gateway in the agent namespace as `uid`, its transparent listener on
    /// `ports.1` (proxy on `ports.0`, admin on `ports.2`), serving one manifest for `pod-agent`
    /// with `connectors` (YAML list items), identity from a token file.
    fn start_gateway(&mut self, uid: &str, connectors: &str, ports: (u16, u16, u16)) {
        let (a, d) = (self.ns.agent.clone(), self.d().to_path_buf());
        let policies = d.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let head = manifest_head("pod-agent", "");
        std::fs::write(policies.join("agent.yaml"), format!("{head}connectors:\n{connectors}")).unwrap();
        std::fs::write(d.join("token"), token("pod-agent")).unwrap();
        let data = d.join("data");
        std::fs::create_dir_all(&data).unwrap();
        sh(&format!("chown -R {uid}:{uid} {}", d.display()));
        std::fs::write(
            d.join("gateway.yaml"),
            format!(
                "listeners:\n  proxy: 127.0.0.1:{}\n  transparent: 0.0.0.0:{}\n  admin: 127.0.0.1:{}\npolicies: {p}\ndata_dir: {data}\nidentity:\n  default_agent: pod-agent\n  token_file: {tok}\ntls:\n  extra_upstream_roots: [{ca}]\nnetwork:\n  allow_private_destinations: [10.201.0.0/24, \"fd00:201::/64\"]\nlog_format: text\n",
                ports.0,
                ports.1,
                ports.2,
                p = policies.display(),
                data = data.display(),
                tok = d.join("token").display(),
                ca = d.join("up-ca.pem").display()
            ),
        )
        .unwrap();
        let gw = in_ns(&a, uid, &[bin(), "run", "-c", d.join("gateway.yaml").to_str().unwrap()])
            .stderr(std::fs::File::create(d.join("gateway.log")).unwrap())
            .spawn()
            .unwrap();
        self.ns.children.push(gw);
        wait_port(&a, ports.1);
    }

    /// The agent namespace's rules, without counters.
    fn rules(&self) -> String {
        let a = &self.ns.agent;
        sh_out(&format!(
            "ip netns exec {a} iptables -S && ip netns exec {a} iptables -t nat -S \
             && ip netns exec {a} ip6tables -S && ip netns exec {a} ip6tables -t nat -S"
        ))
    }
}

fn commands(out: &str) -> Vec<&str> {
    out.lines().filter(|l| !l.starts_with('#')).collect()
}

#[test]
fn redirected_agent_traffic_is_decided_and_recorded() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::start();
    let (a, d) = (lab.ns.agent.clone(), lab.d().to_path_buf());

    // Gateway in the agent namespace, as the proxy UID, identity from a token file.
    let data = d.join("data");
    lab.start_gateway(
        PROXY_UID,
        "  - name: plain\n    hosts: [10.201.0.2]\n    ports: [80]\n    routes:\n      - methods: [GET]\n        path: /v1/items/**\n        action: item.read\n  - name: plain6\n    hosts: [\"fd00:201::2\"]\n    ports: [80]\n    routes:\n      - methods: [GET]\n        path: /v1/items/**\n        action: item.read\n  - name: secure\n    hosts: [api.test]\n    ports: [443]\n    tls: intercept\n    routes:\n      - methods: [GET]\n        path: /v1/items/**\n        action: item.read\n",
        (15080, 15001, 15021),
    );
    let ss = sh_out(&format!("ip netns exec {a} ss -ltn"));
    assert!(ss.contains("[::]:15001"), "the transparent listener does not accept IPv6:\n{ss}");

    // The default resolvers are the namespace's resolv.conf nameservers.
    let (ok, dry_default, err) = lab.init_iptables(&["--dry-run"], None);
    assert!(ok, "{err}");
    assert!(
        dry_default.contains("iptables -A UAPK_EGRESS -d 10.201.0.53 -p udp --dport 53 -j RETURN"),
        "{dry_default}"
    );
    assert!(
        dry_default.contains("ip6tables -A UAPK_EGRESS -d fd00:201::53 -p udp --dport 53 -j RETURN"),
        "{dry_default}"
    );

    // The init container's rules: installed by `init-iptables` itself, exactly the commands
    // --dry-run prints; a second run succeeds and changes nothing.
    let dns = ["--dns", "10.201.0.53", "--dns", "fd00:201::53"];
    let (ok, dry, err) = lab.init_iptables(&[&dns[..], &["--dry-run"]].concat(), None);
    assert!(ok, "{err}");
    let (ok, first, err) = lab.init_iptables(&dns, None);
    assert!(ok, "first install failed: {err}\n{first}");
    assert_eq!(commands(&first), commands(&dry), "the install ran other commands than --dry-run prints");
    assert!(commands(&dry).iter().any(|l| l.starts_with("ip6tables -t nat")), "{dry}");
    let installed = lab.rules();
    let (ok, second, err) = lab.init_iptables(&dns, None);
    assert!(ok, "second install failed: {err}\n{second}");
    assert_eq!(lab.rules(), installed, "a second run changed the rules");
    assert_eq!(installed.matches("-j UAPK_OUTPUT").count(), 2, "{installed}");
    assert_eq!(installed.matches("-j UAPK_EGRESS").count(), 2, "{installed}");

    // An unmodified client, as the agent UID: plain HTTP and HTTPS are decided.
    let (code, body) = curl(&a, AGENT_UID, &[], "http://10.201.0.2/v1/items/1");
    assert_eq!(code, "200", "{body}\n{}", std::fs::read_to_string(d.join("gateway.log")).unwrap_or_default());
    assert!(body.contains("\"path\": \"/v1/items/1\""), "{body}");
    let (code, body) = curl(&a, AGENT_UID, &[], "http://10.201.0.2/v1/other");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("route_not_allowed"), "{body}");
    let ca = data.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let (code, body) = curl(&a, AGENT_UID, &["--cacert", ca], "https://api.test/v1/items/2");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"tls\": true"), "{body}");
    let (code, body) = curl(&a, AGENT_UID, &["--cacert", ca], "https://api.test/v1/private");
    assert_eq!(code, "403", "{body}");
    // The proxy UID is not redirected: it reaches the upstream directly (no gateway record).
    let (code, _) = curl(&a, PROXY_UID, &[], "http://10.201.0.2/v1/direct");
    assert_eq!(code, "200");

    // Plain HTTP on TCP/53 to a host that is not a resolver is redirected and decided like any
    // other port; the upstream, which listens there, never sees it.
    let (code, body) = curl(&a, AGENT_UID, &[], "http://10.201.0.2:53/dns-port/agent");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("host_not_allowed"), "{body}");
    let (code, _) = curl(&a, PROXY_UID, &[], "http://10.201.0.2:53/dns-port/proxy");
    assert_eq!(code, "200", "control: the upstream serves HTTP on 53");
    // TCP/53 to the resolver itself is the one exemption.
    let (code, _) = curl(&a, AGENT_UID, &[], "http://10.201.0.53:53/resolver-tcp");
    assert_eq!(code, "200");

    // IPv6 TCP from the agent is redirected (to [::1]:15001) and decided too: allowed, denied by
    // route, and on port 53.
    let (code, body) = curl(&a, AGENT_UID, &[], "http://[fd00:201::2]/v1/items/6");
    assert_eq!(code, "200", "{body}\n{}", std::fs::read_to_string(d.join("gateway.log")).unwrap_or_default());
    assert!(body.contains("\"path\": \"/v1/items/6\""), "{body}");
    let (code, body) = curl(&a, AGENT_UID, &[], "http://[fd00:201::2]/v1/secret6");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("route_not_allowed"), "{body}");
    let (code, body) = curl(&a, AGENT_UID, &[], "http://[fd00:201::2]:53/dns-port/agent6");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("host_not_allowed"), "{body}");
    let (code, _) = curl(&a, PROXY_UID, &[], "http://[fd00:201::2]/v1/direct6");
    assert_eq!(code, "200", "control: the upstream serves HTTP over IPv6");

    // UDP: QUIC to 443 never leaves (v4 and v6); DNS reaches the resolver and only the resolver.
    for (host, tag) in [("10.201.0.2", "v4"), ("fd00:201::2", "v6")] {
        let agent = lab.probe(AGENT_UID, &["udp", host, "443", &format!("quic-{tag}-agent")]);
        assert!(agent.starts_with("refused"), "{tag}: {agent}");
        let elsewhere = lab.probe(AGENT_UID, &["udp", host, "53", &format!("dns-{tag}-elsewhere")]);
        assert!(elsewhere.starts_with("refused"), "{tag}: {elsewhere}");
        assert_eq!(lab.probe(PROXY_UID, &["udp", host, "443", &format!("quic-{tag}-proxy")]), "sent");
        assert_eq!(lab.probe(PROXY_UID, &["udp", host, "53", &format!("dns-{tag}-proxy")]), "sent");
    }
    // Ping sockets carry data too (allowed for every group here, as container runtimes do): the
    // agent's echo requests are dropped, the proxy UID's answered.
    sh(&format!("ip netns exec {a} sysctl -q -w net.ipv4.ping_group_range='0 2147483647'"));
    for host in ["10.201.0.2", "fd00:201::2"] {
        assert_eq!(lab.probe(PROXY_UID, &["ping", host, "0"]), "reply", "control: ping {host}");
        let agent = lab.probe(AGENT_UID, &["ping", host, "0"]);
        assert!(agent.starts_with("noreply"), "ping {host}: {agent}");
    }
    for (resolver, tag) in [("10.201.0.53", "v4"), ("fd00:201::53", "v6")] {
        let answer = lab.probe(AGENT_UID, &["dns", resolver, "53"]);
        assert_eq!(answer, "answer 10.201.0.2", "{tag} DNS to the resolver");
    }
    // The controls arrived, so the agent's datagrams, sent before them, would have too.
    for control in ["quic-v4-proxy", "quic-v6-proxy", "dns-v4-proxy", "dns-v6-proxy"] {
        lab.wait_upstream(control);
    }
    let seen = lab.upstream_log();
    for never in [
        "quic-v4-agent",
        "quic-v6-agent",
        "dns-v4-elsewhere",
        "dns-v6-elsewhere",
        "/dns-port/agent",
        "/dns-port/agent6",
        "/v1/secret6",
        "/v1/other",
    ] {
        assert!(!seen.contains(never), "{never} reached the upstream undecided:\n{seen}");
    }
    assert!(seen.contains("http 53 /dns-port/proxy") && seen.contains("http 80 /v1/direct6"), "{seen}");
    assert!(seen.contains("http 80 /v1/items/6"), "the allowed IPv6 request was not forwarded:\n{seen}");

    // Stop the gateway (SIGTERM: drain and flush), then read its log.
    let gw = &mut lab.ns.children[1];
    sh(&format!("kill -TERM {}", gw.id()));
    for _ in 0..100 {
        if gw.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let entries = Log::file(data.join("audit.redb")).entries();
    let d2 = decisions(&entries);
    let paths: Vec<String> =
        d2.iter().filter(|e| e["via"] != "explicit").map(|e| e["path"].as_str().unwrap_or("").to_string()).collect();
    for p in ["/v1/items/1", "/v1/other", "/v1/items/2", "/v1/private", "/dns-port/agent", "/v1/items/6", "/v1/secret6"]
    {
        assert!(paths.iter().any(|x| x == p), "{p} not recorded: {paths:?}");
    }
    for p in ["/v1/direct", "/dns-port/proxy", "/v1/direct6", "/resolver-tcp"] {
        assert!(!paths.iter().any(|x| x == p), "{p} must not pass the gateway: {paths:?}");
    }
    assert!(d2.iter().all(|e| e["agent"] == "pod-agent"));
    assert!(d2.iter().any(|e| e["via"] == "transparent" && e["path"] == "/v1/items/1"));
    for (p, decision, code) in [
        ("/dns-port/agent", "deny", Some("host_not_allowed")),
        ("/dns-port/agent6", "deny", Some("host_not_allowed")),
        ("/v1/secret6", "deny", Some("route_not_allowed")),
        ("/v1/items/6", "allow", None),
    ] {
        let e = d2.iter().find(|e| e["path"] == p).unwrap();
        assert_eq!(e["via"], "transparent", "{e}");
        assert_eq!(e["decision"], decision, "{e}");
        if let Some(code) = code {
            assert_eq!(e["reasons"][0]["code"], code, "{e}");
        }
    }
}

#[test]
fn without_ip6tables_ipv6_egress_is_disabled_not_left_open() {
    if !can_run() {
        return;
    }
    let lab = Lab::start();
    let a = lab.ns.agent.clone();
    // A PATH with iptables but no ip6tables, as in an image that lacks it.
    let tools = lab.d().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let iptables = std::fs::canonicalize(sh_out("command -v iptables").trim()).unwrap();
    std::os::unix::fs::symlink(iptables, tools.join("iptables")).unwrap();
    let path = format!("{}:/usr/bin:/bin", tools.display());
    let (ok, out, err) = lab.init_iptables(&["--dns", "10.201.0.53", "--dns", "fd00:201::53"], Some(Path::new(&path)));
    assert!(ok, "{err}\n{out}");
    assert!(out.contains("ip6tables is not usable: disabling IPv6"), "{out}");
    assert!(commands(&out).iter().all(|l| !l.starts_with("ip6tables")), "{out}");
    let disabled = sh_out(&format!("ip netns exec {a} cat /proc/sys/net/ipv6/conf/all/disable_ipv6"));
    assert_eq!(disabled.trim(), "1");

    // Nothing leaves over IPv6, TCP or UDP; the IPv4 rules are in place.
    let (code, _) = curl(&a, AGENT_UID, &[], "http://[fd00:201::2]/v1/items/6");
    assert_eq!(code, "000", "IPv6 TCP must fail");
    let udp6 = lab.probe(AGENT_UID, &["udp", "fd00:201::2", "443", "quic-v6-agent"]);
    let udp4 = lab.probe(AGENT_UID, &["udp", "10.201.0.2", "443", "quic-v4-agent"]);
    assert!(udp4.starts_with("refused"), "{udp4}");
    assert_eq!(lab.probe(PROXY_UID, &["udp", "10.201.0.2", "443", "quic-v4-proxy"]), "sent");
    lab.wait_upstream("quic-v4-proxy");
    let seen = lab.upstream_log();
    for never in ["/v1/items/6", "quic-v6-agent", "quic-v4-agent"] {
        assert!(!seen.contains(never), "{never} reached the upstream ({udp6}):\n{seen}");
    }
    let rules = sh_out(&format!("ip netns exec {a} iptables -t nat -S"));
    assert!(rules.contains("-A UAPK_OUTPUT -p tcp -j REDIRECT --to-ports 15001"), "{rules}");
}

/// A stand-in for Istio's Envoy: listens on 15001 as UID 1337 (where Istio's rules redirect a
/// pod's outbound TCP), logs each connection's original destination and relays it there.
const ENVOY_PY: &str = r#"
import socket, struct, sys, threading
log = sys.argv[1]
def note(line):
    with open(log, "a") as f:
        f.write(line + "\n")
def pipe(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        try: b.shutdown(socket.SHUT_WR)
        except OSError: pass
def serve(c):
    raw = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    port, ip = struct.unpack("!H", raw[2:4])[0], socket.inet_ntoa(raw[4:8])
    note(f"envoy {ip}:{port}")
    u = socket.create_connection((ip, port))
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    pipe(u, c)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 15001)); s.listen(64)
note("ready")
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Inside an Istio mesh (transparent mode): Istio's rules are installed first (its init
/// container or CNI), as `istio-iptables` writes them — every TCP connection of the pod but
/// Envoy's (UID 1337) to Envoy on 15001. `init-iptables --exempt-uid 1337` then puts the
/// gateway's chain ahead of Istio's: the agent is still redirected to the gateway and decided,
/// the gateway's own upstream connection goes on through Envoy, and Envoy's connections go out
/// instead of coming back to the gateway.
#[test]
fn init_iptables_after_istio_rules_still_redirects_the_agent() {
    if !can_run() {
        return;
    }
    const GATEWAY_UID: &str = "14337";
    const ENVOY_UID: &str = "1337";
    let mut lab = Lab::start();
    let (a, d) = (lab.ns.agent.clone(), lab.d().to_path_buf());
    for rule in [
        "-t nat -N ISTIO_REDIRECT",
        "-t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-t nat -N ISTIO_OUTPUT",
        "-t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-t nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-t nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        "-t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT",
    ] {
        sh(&format!("ip netns exec {a} iptables {rule}"));
    }
    let envoy_log = d.join("envoy.log");
    std::fs::write(d.join("envoy.py"), ENVOY_PY).unwrap();
    std::fs::write(&envoy_log, "").unwrap();
    sh(&format!("chmod 0666 {}", envoy_log.display()));
    let envoy =
        in_ns(&a, ENVOY_UID, &[PY, d.join("envoy.py").to_str().unwrap(), envoy_log.to_str().unwrap()]).spawn().unwrap();
    lab.ns.children.push(envoy);
    wait_port(&a, 15001);

    lab.start_gateway(
        GATEWAY_UID,
        "  - name: plain\n    hosts: [10.201.0.2]\n    ports: [80]\n    routes:\n      - methods: [GET]\n        path: /v1/items/**\n        action: item.read\n",
        (14080, 14001, 14021),
    );

    let out = Command::new("ip")
        .args(["netns", "exec", &a, bin(), "init-iptables", "--proxy-uid", GATEWAY_UID, "--port", "14001"])
        .args(["--exempt-uid", ENVOY_UID, "--dns", "10.201.0.53", "--dns", "fd00:201::53"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The gateway's jump comes first in nat OUTPUT, Istio's after it.
    let nat = sh_out(&format!("ip netns exec {a} iptables -t nat -S OUTPUT"));
    let (ours, istio) = (nat.find("-j UAPK_OUTPUT"), nat.find("-j ISTIO_OUTPUT"));
    assert!(ours.is_some() && istio.is_some() && ours < istio, "{nat}");

    let gateway_log = || std::fs::read_to_string(d.join("gateway.log")).unwrap_or_default();
    // The agent: redirected to the gateway and decided (allowed, recorded; denied by route) ...
    let (code, body) = curl(&a, AGENT_UID, &["-D", "-"], "http://10.201.0.2/v1/items/1");
    assert_eq!(code, "200", "{body}\n{}", gateway_log());
    assert!(body.to_ascii_lowercase().contains("x-uapk-record:"), "not decided by the gateway: {body}");
    let (code, body) = curl(&a, AGENT_UID, &[], "http://10.201.0.2/v1/other");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("route_not_allowed"), "{body}");
    // ... and the gateway's own connection to the upstream went on through Envoy.
    let envoy_seen = std::fs::read_to_string(&envoy_log).unwrap_or_default();
    assert!(envoy_seen.contains("envoy 10.201.0.2:80"), "the gateway's upstream call bypassed Envoy:\n{envoy_seen}");
    assert!(lab.upstream_log().contains("/v1/items/1"));
    assert!(!lab.upstream_log().contains("/v1/other"), "a refused request reached the upstream");
    // Envoy's own connections are not sent back to the gateway: the gateway would refuse this
    // path, the upstream answers it.
    let (code, _) = curl(&a, ENVOY_UID, &[], "http://10.201.0.2/v1/from-envoy");
    assert_eq!(code, "200");
    lab.wait_upstream("/v1/from-envoy");
    // The agent's UDP still never leaves.
    assert!(lab.probe(AGENT_UID, &["udp", "10.201.0.2", "443", "quic-mesh-agent"]).starts_with("refused"));
}
