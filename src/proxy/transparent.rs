//! The transparent listener: the pod's iptables rules REDIRECT all agent TCP egress here. The
//! original destination comes from `SO_ORIGINAL_DST`; the first bytes (read with a deadline)
//! tell TLS from plain HTTP. TLS is authorised by SNI like a CONNECT and then intercepted or
//! spliced; plain HTTP goes through the data path with its `Host`. A connection whose original
//! destination is the gateway itself is refused (no loops).
//!
//! Also the rules `init-iptables` installs (`iptables_rules`, [`install`]): all agent TCP,
//! IPv4 and IPv6, redirected here; every other agent packet dropped but DNS to the resolvers.

use super::conn::{self, ConnSlot, ConnTimeouts};
use super::connect::{Tunnel, authorize_tunnel, intercept, passthrough};
use super::{App, Arrival, Facts, handle};
use crate::config::TlsMode;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// The destination the client dialled before iptables redirected it.
pub(crate) fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()?.ip() {
        IpAddr::V4(_) => sock.original_dst()?,
        IpAddr::V6(_) => sock.original_dst_ipv6()?,
    };
    addr.as_socket().ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// Handles one redirected connection.
/// It holds `slot` (its place under `limits.max_connections`) for as long as it is open.
pub(crate) async fn serve_connection(gw: Arc<App>, stream: TcpStream, own: Vec<SocketAddr>, slot: ConnSlot) {
    let orig = match original_destination(&stream) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "transparent connection without an original destination; closing");
            return;
        }
    };
    let local = stream.local_addr().ok();
    let loops = own.iter().chain(local.iter()).any(|a| {
        a.port() == orig.port() && (a.ip() == orig.ip() || a.ip().is_unspecified() || orig.ip().is_loopback())
    });
    if loops {
        tracing::warn!(%orig, "refusing a transparent connection to the gateway itself");
        return;
    }
    // Peek (not read) the first bytes, so a passthrough tunnel can still forward them.
    let deadline = crate::clock::instant() + gw.config().limits.header_read_timeout;
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    let mut sni = None;
    let mut is_tls = false;
    while crate::clock::instant() < deadline {
        let left = deadline.saturating_duration_since(crate::clock::instant());
        match tokio::time::timeout(left, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => {
                is_tls = buf[0] == 0x16;
                if !is_tls {
                    break;
                }
                match super::tls::client_hello_sni(&buf[..n]) {
                    Ok(name) => {
                        sni = name;
                        break;
                    }
                    Err(_) if n > seen && n < buf.len() => {
                        // Not all of the ClientHello has arrived yet.
                        seen = n;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(_) => break,
                }
            }
        }
    }
    if !is_tls {
        let (builder, timeouts) = (conn::builder(&gw.config().limits), ConnTimeouts::from_limits(&gw.config().limits));
        let svc = move |req| {
            let gw = gw.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(gw, req, Arrival::Transparent(orig)).await) }
        };
        conn::serve_http(&builder, stream, svc, Some(slot), timeouts).await;
        return;
    }
    // The SNI is compared and recorded as every other host is (lower-case, no trailing dot); a
    // name that does not normalise falls back to the dialled address, which no name matches.
    let host = sni.as_deref().and_then(super::normalize_host).unwrap_or_else(|| orig.ip().to_string());
    let mut facts = Facts::new(&http::Method::CONNECT, &http::Uri::from_static("/"), Arrival::Transparent(orig));
    facts.line.tunnel(host.clone(), orig.port());
    let Ok((connector, record)) = authorize_tunnel(&gw, &mut facts, &http::HeaderMap::new(), None).await else {
        return;
    };
    let tunnel = Arc::new(Tunnel { host, port: orig.port(), token: None, agent: facts.caller.agent.clone() });
    match connector.tls {
        TlsMode::Intercept => intercept(gw, stream, tunnel, Some(slot)).await,
        TlsMode::Passthrough => {
            passthrough(gw, stream, &tunnel, &connector, &facts, record).await;
            drop(slot);
        }
    }
}

/// Name of the nat chain that redirects the agent's TCP connections.
pub(crate) const NAT_CHAIN: &str = "UAPK_OUTPUT";
/// Name of the filter chain that drops every other agent datagram.
pub(crate) const FILTER_CHAIN: &str = "UAPK_EGRESS";

/// How the installer treats one command, so that running the rules twice neither fails half-way
/// nor leaves duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `-N CHAIN`: when the chain already exists it is flushed (`-F CHAIN`) instead.
    NewChain,
    /// `-A CHAIN ...` into our own chain (just created or flushed).
    Append,
    /// `-I OUTPUT 1 ...`: the jump into our chain, skipped when already present (`-C`).
    Hook,
}

/// One `iptables` / `ip6tables` command of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The command and its arguments, `iptables` or `ip6tables` first.
    pub argv: Vec<String>,
    /// How the installer runs it, so that running the plan twice is harmless.
    pub step: Step,
}

impl Rule {
    /// True for `ip6tables` commands.
    pub(crate) fn is_ipv6(&self) -> bool {
        self.argv.first().is_some_and(|b| b == "ip6tables")
    }

    /// True for commands on the nat table.
    pub(crate) fn is_nat(&self) -> bool {
        self.argv.windows(2).any(|w| w[0] == "-t" && w[1] == "nat")
    }

    /// The command as a shell line.
    pub(crate) fn line(&self) -> String {
        self.argv.join(" ")
    }

    /// The command that stands in for this one when the rules are already (partly) installed:
    /// `-F CHAIN` for `-N CHAIN`, the `-C` check for a hook.
    fn variant(&self, with: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(self.argv.len());
        let mut it = self.argv.iter();
        while let Some(a) = it.next() {
            match (self.step, a.as_str()) {
                (Step::NewChain, "-N") => out.push(with.to_string()),
                (Step::Hook, "-I") => {
                    out.push(with.to_string());
                    if let Some(chain) = it.next() {
                        out.push(chain.clone());
                    }
                    // Skip the position: `-C` takes none.
                    it.next();
                }
                _ => out.push(a.clone()),
            }
        }
        out
    }
}

#[cfg(test)]
/// The rules the pod's init container installs, IPv4 (`iptables`) then IPv6 (`ip6tables`), each
/// family filter table first (so a failure half-way leaves traffic dropped, not open), then nat:
///
/// - filter `UAPK_EGRESS`, hooked first in `OUTPUT`: loopback and the gateway's UID return;
///   DNS (UDP and TCP 53) returns only to `resolvers` of the family; a TCP connection the nat
///   rules did not redirect is dropped at its SYN; other TCP returns (redirected connections and
///   answers on connections that came in); ICMP echo requests (ping sockets carry data) are
///   dropped, other ICMP (errors, neighbour discovery) returns; every other packet — UDP (so
///   QUIC fails and clients fall back to TCP), SCTP, DCCP, raw IP — is dropped.
/// - nat `UAPK_OUTPUT`, hooked first in `OUTPUT` for TCP: loopback, the gateway's UID and TCP 53
///   to a resolver return; every other TCP connection is redirected to `port`.
pub(crate) fn iptables_rules(proxy_uid: u32, port: u16, resolvers: &[IpAddr]) -> Vec<Rule> {
    iptables_rules_exempting(proxy_uid, &[], port, resolvers)
}

/// `iptables_rules`, with further UIDs whose traffic is neither redirected nor dropped: the
/// sidecar proxy of a service mesh sharing the pod (Istio's Envoy runs as UID 1337), whose own
/// connections must go out rather than come back to the gateway. The agent must never run as
/// one of them.
pub fn iptables_rules_exempting(proxy_uid: u32, exempt: &[u32], port: u16, resolvers: &[IpAddr]) -> Vec<Rule> {
    let mut uids = vec![proxy_uid];
    uids.extend(exempt.iter().copied().filter(|u| *u != proxy_uid));
    uids.dedup();
    let mut out = Vec::new();
    for (bin, v6) in [("iptables", false), ("ip6tables", true)] {
        let dns: Vec<IpAddr> = resolvers.iter().copied().filter(|r| r.is_ipv6() == v6).collect();
        let mut push = |step: Step, args: String| {
            let argv = std::iter::once(bin.to_string()).chain(args.split_whitespace().map(str::to_string)).collect();
            out.push(Rule { argv, step });
        };
        let f = FILTER_CHAIN;
        push(Step::NewChain, format!("-N {f}"));
        push(Step::Append, format!("-A {f} -o lo -j RETURN"));
        for uid in &uids {
            push(Step::Append, format!("-A {f} -m owner --uid-owner {uid} -j RETURN"));
        }
        for r in &dns {
            push(Step::Append, format!("-A {f} -d {r} -p udp --dport 53 -j RETURN"));
            push(Step::Append, format!("-A {f} -d {r} -p tcp --dport 53 -j RETURN"));
        }
        push(Step::Append, format!("-A {f} -p tcp --syn -m conntrack ! --ctstate DNAT -j DROP"));
        push(Step::Append, format!("-A {f} -p tcp -j RETURN"));
        let (icmp, icmp_type) = if v6 { ("ipv6-icmp", "--icmpv6-type") } else { ("icmp", "--icmp-type") };
        push(Step::Append, format!("-A {f} -p {icmp} {icmp_type} echo-request -j DROP"));
        push(Step::Append, format!("-A {f} -p {icmp} -j RETURN"));
        push(Step::Append, format!("-A {f} -j DROP"));
        push(Step::Hook, format!("-I OUTPUT 1 -j {f}"));

        let n = NAT_CHAIN;
        push(Step::NewChain, format!("-t nat -N {n}"));
        push(Step::Append, format!("-t nat -A {n} -o lo -j RETURN"));
        for uid in &uids {
            push(Step::Append, format!("-t nat -A {n} -m owner --uid-owner {uid} -j RETURN"));
        }
        for r in &dns {
            push(Step::Append, format!("-t nat -A {n} -d {r} -p tcp --dport 53 -j RETURN"));
        }
        push(Step::Append, format!("-t nat -A {n} -p tcp -j REDIRECT --to-ports {port}"));
        push(Step::Hook, format!("-t nat -I OUTPUT 1 -p tcp -j {n}"));
    }
    out
}

/// The `nameserver` addresses of a resolv.conf, in order, without duplicates (a zone index such
/// as `%eth0` is dropped; lines that do not parse are skipped).
pub(crate) fn resolv_conf_nameservers(text: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let addr = addr.split('%').next().unwrap_or(addr);
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// The resolvers DNS may go to: `--dns` when given, else the `nameserver` lines of
/// `/etc/resolv.conf` (none when it cannot be read: DNS then only works over loopback).
pub fn resolvers(given: &[IpAddr]) -> Vec<IpAddr> {
    if given.is_empty() {
        return std::fs::read_to_string("/etc/resolv.conf").map(|t| resolv_conf_nameservers(&t)).unwrap_or_default();
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in given.iter().map(|ip| ip.to_canonical()) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Runs one command: `Ok(true)` when it exited 0, `Ok(false)` when it failed, `Err` when it could
/// not be started (binary missing). The installer takes it as a parameter so its logic is tested
/// without root.
pub trait Runner {
    /// Runs `argv` (the binary first): `Ok((exited 0, its stderr))`, or `Err` when it could not be
    /// started.
    fn run(&mut self, argv: &[String]) -> std::io::Result<(bool, String)>;
}

/// Runs commands as child processes, capturing their stderr.
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&mut self, argv: &[String]) -> std::io::Result<(bool, String)> {
        let (bin, args) = argv.split_first().ok_or_else(|| std::io::Error::other("empty command"))?;
        let out = std::process::Command::new(bin).args(args).stdin(std::process::Stdio::null()).output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// What to do with IPv6 egress when `ip6tables` cannot redirect it.
const IPV6_FALLBACK: &str = "without a usable ip6tables nat table only the IPv6 filter rules are installed (new IPv6 TCP \
     connections are dropped instead of redirected); without a usable ip6tables at all IPv6 is disabled: \
     1 > /proc/sys/net/ipv6/conf/{all,default,<each interface>}/disable_ipv6";

/// Prints the plan (`dry_run`) or installs it, writing each command it runs to `out`. IPv4 rules
/// must all succeed. For IPv6: with a usable `ip6tables` nat table all rules are installed; with
/// only the filter table, the filter rules (so IPv6 TCP is dropped, not redirected); without
/// `ip6tables`, or when one of its rules fails, IPv6 is disabled through
/// `/proc/sys/net/ipv6/conf/*/disable_ipv6`, checked by reading it back. Anything less is an error: the init container fails and the pod never starts
/// with an open way out.
pub fn install(
    rules: &[Rule],
    resolvers: &[IpAddr],
    dry_run: bool,
    runner: &mut dyn Runner,
    ipv6_conf: &std::path::Path,
    out: &mut dyn std::io::Write,
) -> Result<(), String> {
    let w = |out: &mut dyn std::io::Write, line: &str| -> Result<(), String> {
        writeln!(out, "{line}").map_err(|e| format!("writing the rules: {e}"))
    };
    let dns: Vec<String> = resolvers.iter().map(|r| r.to_string()).collect();
    let dns = if dns.is_empty() { "none (loopback only)".to_string() } else { dns.join(" ") };
    w(out, &format!("# DNS (UDP and TCP 53) allowed only to: {dns}"))?;
    if dry_run {
        for r in rules {
            w(out, &r.line())?;
        }
        return w(out, &format!("# {IPV6_FALLBACK}"));
    }
    let (v4, v6): (Vec<&Rule>, Vec<&Rule>) = rules.iter().partition(|r| !r.is_ipv6());
    apply(&v4, runner, out)?;
    if v6.is_empty() {
        return Ok(());
    }
    let probe = |runner: &mut dyn Runner, table: &[&str]| -> bool {
        let mut argv = vec!["ip6tables".to_string()];
        argv.extend(table.iter().map(|s| s.to_string()));
        argv.extend(["-S".to_string(), "OUTPUT".to_string()]);
        matches!(runner.run(&argv), Ok((true, _)))
    };
    let filter_ok = probe(runner, &[]);
    let nat_ok = filter_ok && probe(runner, &["-t", "nat"]);
    let applied = if nat_ok {
        apply(&v6, runner, out)
    } else if filter_ok {
        w(out, "# ip6tables has no usable nat table: IPv6 TCP is dropped instead of redirected")?;
        let filter: Vec<&Rule> = v6.into_iter().filter(|r| !r.is_nat()).collect();
        apply(&filter, runner, out)
    } else {
        Err("ip6tables is not usable".to_string())
    };
    match applied {
        Ok(()) => Ok(()),
        Err(why) => {
            // Whatever the ip6tables rules could not do, IPv6 must not stay a way out.
            w(out, &format!("# {why}: disabling IPv6"))?;
            disable_ipv6(ipv6_conf, out).map_err(|e| format!("{why}; {e}"))
        }
    }
}

fn apply(rules: &[&Rule], runner: &mut dyn Runner, out: &mut dyn std::io::Write) -> Result<(), String> {
    for rule in rules {
        let argv = match rule.step {
            Step::Append => rule.argv.clone(),
            Step::NewChain => {
                // Flush/create: a chain left by an earlier run is flushed, then refilled.
                if matches!(runner.run(&rule.variant("-S")), Ok((true, _))) {
                    rule.variant("-F")
                } else {
                    rule.argv.clone()
                }
            }
            Step::Hook => {
                if matches!(runner.run(&rule.variant("-C")), Ok((true, _))) {
                    writeln!(out, "# already installed: {}", rule.line()).map_err(|e| e.to_string())?;
                    continue;
                }
                rule.argv.clone()
            }
        };
        writeln!(out, "{}", argv.join(" ")).map_err(|e| e.to_string())?;
        match runner.run(&argv) {
            Ok((true, _)) => {}
            Ok((false, err)) => return Err(format!("`{}` failed: {err}", argv.join(" "))),
            Err(e) => return Err(format!("running `{}`: {e}", argv.join(" "))),
        }
    }
    Ok(())
}

/// Disables IPv6 on every interface of this network namespace and checks it took. Without IPv6
/// in the kernel (no `ipv6_conf` directory) there is nothing to disable.
fn disable_ipv6(ipv6_conf: &std::path::Path, out: &mut dyn std::io::Write) -> Result<(), String> {
    if !ipv6_conf.exists() {
        writeln!(out, "# IPv6 is not available in this kernel: nothing to disable").map_err(|e| e.to_string())?;
        return Ok(());
    }
    let mut names = vec!["all".to_string(), "default".to_string()];
    let dir = std::fs::read_dir(ipv6_conf).map_err(|e| format!("reading {}: {e}", ipv6_conf.display()))?;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    for name in &names {
        let path = ipv6_conf.join(name).join("disable_ipv6");
        writeln!(out, "echo 1 > {}", path.display()).map_err(|e| e.to_string())?;
        std::fs::write(&path, "1\n").map_err(|e| {
            format!(
                "cannot disable IPv6 ({}: {e}) and ip6tables is not usable: IPv6 egress would bypass the gateway",
                path.display()
            )
        })?;
        let now = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        if now.trim() != "1" {
            return Err(format!(
                "{} reads {} after writing 1: IPv6 egress would bypass the gateway",
                path.display(),
                now.trim()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
