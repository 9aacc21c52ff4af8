use super::*;
use std::collections::BTreeMap;
use std::net::IpAddr;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn lines(rules: &[Rule]) -> Vec<String> {
    rules.iter().map(Rule::line).collect()
}

#[test]
fn gateway_uid_loopback_and_resolver_dns_return_before_the_redirect() {
    let rules = iptables_rules(1337, 15001, &[ip("10.96.0.10")]);
    let v4: Vec<String> = lines(&rules).into_iter().filter(|l| l.starts_with("iptables -t nat")).collect();
    let pos = |needle: &str| v4.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {v4:?}"));
    let redirect = pos("REDIRECT --to-ports 15001");
    assert!(pos("-o lo -j RETURN") < redirect);
    assert!(pos("--uid-owner 1337 -j RETURN") < redirect);
    assert!(pos("-d 10.96.0.10 -p tcp --dport 53 -j RETURN") < redirect);
    assert_eq!(v4.last().map(String::as_str), Some("iptables -t nat -I OUTPUT 1 -p tcp -j UAPK_OUTPUT"));
    // Both families redirect TCP.
    assert!(lines(&rules).iter().any(|l| l == "ip6tables -t nat -A UAPK_OUTPUT -p tcp -j REDIRECT --to-ports 15001"));
}

#[test]
fn dns_is_exempt_only_to_the_resolvers_of_each_family() {
    let rules = iptables_rules(1337, 15001, &[ip("10.96.0.10"), ip("fd00::53")]);
    for l in lines(&rules) {
        if l.contains("--dport 53") {
            let v6 = l.starts_with("ip6tables ");
            let want = if v6 { "-d fd00::53 " } else { "-d 10.96.0.10 " };
            assert!(l.contains(want), "a port-53 rule without the family's resolver: {l}");
        }
        // No rule returns on a port alone.
        assert!(!l.contains("--dport 53 -j RETURN") || l.contains(" -d "), "{l}");
    }
    let count = |prefix: &str, needle: &str| {
        lines(&rules).iter().filter(|l| l.starts_with(prefix) && l.contains(needle)).count()
    };
    assert_eq!(count("iptables ", "-p udp --dport 53"), 1);
    assert_eq!(count("ip6tables ", "-p udp --dport 53"), 1);
    // Without resolvers, no DNS exemption at all.
    let none = iptables_rules(1337, 15001, &[]);
    assert!(!lines(&none).iter().any(|l| l.contains("--dport 53")));
}

#[test]
fn every_other_datagram_is_dropped_and_unredirected_tcp_too() {
    let rules = iptables_rules(1337, 15001, &[ip("10.96.0.10")]);
    for bin in ["iptables", "ip6tables"] {
        let f: Vec<String> = lines(&rules)
            .into_iter()
            .filter(|l| l.starts_with(&format!("{bin} ")) && !l.contains("-t nat") && l.contains("UAPK_EGRESS"))
            .collect();
        assert_eq!(f.first().map(String::as_str), Some(&format!("{bin} -N UAPK_EGRESS")[..]));
        assert_eq!(f.last().map(String::as_str), Some(&format!("{bin} -I OUTPUT 1 -j UAPK_EGRESS")[..]));
        assert_eq!(f[f.len() - 2], format!("{bin} -A UAPK_EGRESS -j DROP"));
        // The only UDP that returns goes to a resolver's port 53.
        for l in f.iter().filter(|l| l.contains("RETURN")) {
            assert!(!l.contains("-p udp") || l.contains("--dport 53") && l.contains(" -d "), "{l}");
            assert!(l.contains("-p ") || l.contains("-o lo") || l.contains("--uid-owner 1337"), "{l}");
        }
        let syn = f.iter().position(|l| l.contains("--syn -m conntrack ! --ctstate DNAT -j DROP")).expect("syn drop");
        let tcp = f.iter().position(|l| l.ends_with("-p tcp -j RETURN")).expect("tcp return");
        assert!(syn < tcp);
        assert!(f.iter().any(|l| l.contains("echo-request -j DROP")));
    }
}

#[test]
fn resolv_conf_nameservers_are_read_in_order_without_duplicates() {
    let text = "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n\
                nameserver 10.96.0.10\nnameserver not-an-ip\n  nameserver   fd00::53  \noptions ndots:5\n";
    assert_eq!(resolv_conf_nameservers(text), vec![ip("10.96.0.10"), ip("fe80::1"), ip("fd00::53")]);
    assert_eq!(resolvers(&[ip("::ffff:10.0.0.1"), ip("10.0.0.1")]), vec![ip("10.0.0.1")]);
}

/// An in-memory iptables: chains per (binary, table), with the error behaviour of the real
/// commands for `-N` on an existing chain and `-F`/`-S` on a missing one.
#[derive(Default, Clone, PartialEq, Debug)]
struct FakeTables {
    chains: BTreeMap<(String, String, String), Vec<String>>,
    no_ip6tables: bool,
    no_ip6_nat: bool,
    /// An ip6tables command containing this fails (a match module the kernel lacks).
    ip6_fails_on: Option<String>,
}

impl FakeTables {
    fn new() -> Self {
        let mut t = FakeTables::default();
        for bin in ["iptables", "ip6tables"] {
            for table in ["filter", "nat"] {
                t.chains.insert((bin.into(), table.into(), "OUTPUT".into()), Vec::new());
            }
        }
        t
    }
}

impl Runner for FakeTables {
    fn run(&mut self, argv: &[String]) -> std::io::Result<(bool, String)> {
        let bin = argv[0].clone();
        if bin == "ip6tables" && self.no_ip6tables {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no ip6tables"));
        }
        let mut args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        let mut table = "filter".to_string();
        if args.first() == Some(&"-t") {
            table = args[1].to_string();
            args.drain(..2);
        }
        if bin == "ip6tables" && self.ip6_fails_on.as_ref().is_some_and(|f| argv.join(" ").contains(f.as_str())) {
            return Ok((false, "no such match".into()));
        }
        if bin == "ip6tables" && table == "nat" && self.no_ip6_nat {
            return Ok((false, "table nat does not exist".into()));
        }
        let key = |c: &str| (bin.clone(), table.clone(), c.to_string());
        let (op, chain, rest) = (args[0], args[1], args[2..].join(" "));
        let exists = self.chains.contains_key(&key(chain));
        let ok = match op {
            "-N" if exists => false,
            "-N" => self.chains.insert(key(chain), Vec::new()).is_none(),
            "-F" | "-S" if !exists => false,
            "-F" => {
                self.chains.insert(key(chain), Vec::new());
                true
            }
            "-S" => true,
            "-A" if exists => self.chains.get_mut(&key(chain)).map(|c| c.push(rest)).is_some(),
            "-I" if exists => {
                let spec = args[3..].join(" ");
                self.chains.get_mut(&key(chain)).map(|c| c.insert(0, spec)).is_some()
            }
            "-C" => self.chains.get(&key(chain)).is_some_and(|c| c.contains(&rest)),
            _ => false,
        };
        Ok((ok, if ok { String::new() } else { format!("{op} {chain} failed") }))
    }
}

fn run_install(t: &mut FakeTables, conf: &std::path::Path, dry_run: bool) -> (Result<(), String>, String) {
    let dns = [ip("10.96.0.10"), ip("fd00::53")];
    let rules = iptables_rules(1337, 15001, &dns);
    let mut out = Vec::new();
    let r = install(&rules, &dns, dry_run, t, conf, &mut out);
    (r, String::from_utf8(out).expect("utf-8"))
}

#[test]
fn installing_twice_leaves_the_same_rules_without_duplicates() {
    let conf = tempfile::tempdir().expect("tempdir");
    let mut t = FakeTables::new();
    let (r, first) = run_install(&mut t, conf.path(), false);
    r.expect("first run");
    let after_first = t.clone();
    let redirect = &after_first.chains[&("ip6tables".into(), "nat".into(), "UAPK_OUTPUT".into())];
    assert_eq!(redirect.last().map(String::as_str), Some("-p tcp -j REDIRECT --to-ports 15001"));
    assert_eq!(after_first.chains[&("iptables".into(), "nat".into(), "OUTPUT".into())], vec!["-p tcp -j UAPK_OUTPUT"]);
    let (r, second) = run_install(&mut t, conf.path(), false);
    r.expect("second run");
    assert_eq!(t, after_first, "a second run changed the rules");
    assert!(second.contains("iptables -F UAPK_EGRESS"), "{second}");
    assert!(second.contains("# already installed: iptables -t nat -I OUTPUT 1 -p tcp -j UAPK_OUTPUT"), "{second}");
    // The first run printed exactly the dry-run's commands.
    let (r, dry) = run_install(&mut FakeTables::new(), conf.path(), true);
    r.expect("dry run");
    let commands = |s: &str| s.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(commands(&first), commands(&dry));
    assert_eq!(commands(&dry).len(), iptables_rules(1337, 15001, &[ip("10.96.0.10"), ip("fd00::53")]).len());
}

#[test]
fn without_an_ip6tables_nat_table_ipv6_tcp_is_dropped_not_left_open() {
    let conf = tempfile::tempdir().expect("tempdir");
    let mut t = FakeTables::new();
    t.no_ip6_nat = true;
    let (r, out) = run_install(&mut t, conf.path(), false);
    r.expect("install");
    assert!(out.contains("no usable nat table"), "{out}");
    let f = &t.chains[&("ip6tables".into(), "filter".into(), "UAPK_EGRESS".into())];
    assert!(f.contains(&"-p tcp --syn -m conntrack ! --ctstate DNAT -j DROP".to_string()), "{f:?}");
    assert_eq!(t.chains[&("ip6tables".into(), "filter".into(), "OUTPUT".into())], vec!["-j UAPK_EGRESS"]);
}

fn fake_conf(dir: &std::path::Path, names: &[&str]) {
    for n in names {
        std::fs::create_dir_all(dir.join(n)).expect("mkdir");
        std::fs::write(dir.join(n).join("disable_ipv6"), "0\n").expect("write");
    }
}

#[test]
fn without_ip6tables_ipv6_is_disabled_on_every_interface() {
    let conf = tempfile::tempdir().expect("tempdir");
    fake_conf(conf.path(), &["all", "default", "lo", "eth0"]);
    let mut t = FakeTables::new();
    t.no_ip6tables = true;
    let (r, out) = run_install(&mut t, conf.path(), false);
    r.expect("install");
    for n in ["all", "default", "lo", "eth0"] {
        let v = std::fs::read_to_string(conf.path().join(n).join("disable_ipv6")).expect("read");
        assert_eq!(v.trim(), "1", "{n}");
    }
    assert!(out.contains("ip6tables is not usable: disabling IPv6"), "{out}");
    // The IPv4 rules are installed all the same.
    assert!(t.chains.contains_key(&("iptables".into(), "nat".into(), "UAPK_OUTPUT".into())));
    assert!(!t.chains.contains_key(&("ip6tables".into(), "nat".into(), "UAPK_OUTPUT".into())));
}

#[test]
fn an_ip6tables_rule_that_fails_half_way_disables_ipv6() {
    let conf = tempfile::tempdir().expect("tempdir");
    fake_conf(conf.path(), &["all", "default", "eth0"]);
    let mut t = FakeTables::new();
    t.ip6_fails_on = Some("--ctstate DNAT".into());
    let (r, out) = run_install(&mut t, conf.path(), false);
    r.expect("install");
    assert!(out.contains("failed: no such match: disabling IPv6"), "{out}");
    for n in ["all", "default", "eth0"] {
        let v = std::fs::read_to_string(conf.path().join(n).join("disable_ipv6")).expect("read");
        assert_eq!(v.trim(), "1", "{n}");
    }
    // And when IPv6 cannot be disabled either, the install fails with both reasons.
    std::fs::remove_file(conf.path().join("eth0").join("disable_ipv6")).expect("rm");
    std::fs::create_dir_all(conf.path().join("eth0").join("disable_ipv6")).expect("mkdir");
    let (r, _) = run_install(
        &mut FakeTables { ip6_fails_on: Some("--ctstate DNAT".into()), ..FakeTables::new() },
        conf.path(),
        false,
    );
    let err = r.expect_err("must fail closed");
    assert!(err.contains("no such match") && err.contains("IPv6 egress would bypass the gateway"), "{err}");
}

#[test]
fn without_ip6tables_and_without_a_writable_switch_the_install_fails() {
    let conf = tempfile::tempdir().expect("tempdir");
    fake_conf(conf.path(), &["all", "default"]);
    // A directory where the switch should be: the write fails, as on a read-only /proc/sys.
    std::fs::create_dir_all(conf.path().join("eth0").join("disable_ipv6")).expect("mkdir");
    let mut t = FakeTables::new();
    t.no_ip6tables = true;
    let (r, _) = run_install(&mut t, conf.path(), false);
    let err = r.expect_err("must fail closed");
    assert!(err.contains("IPv6 egress would bypass the gateway"), "{err}");
    // No IPv6 in the kernel at all: nothing can leave over IPv6, the install succeeds.
    let (r, out) = run_install(&mut t, &conf.path().join("missing"), false);
    r.expect("no ipv6");
    assert!(out.contains("IPv6 is not available"), "{out}");
}

#[test]
fn a_failing_ipv4_command_stops_the_install_with_its_message() {
    let conf = tempfile::tempdir().expect("tempdir");
    let mut t = FakeTables::new();
    t.chains.remove(&("iptables".into(), "nat".into(), "OUTPUT".into()));
    let (r, _) = run_install(&mut t, conf.path(), false);
    let err = r.expect_err("must fail");
    assert!(err.contains("iptables -t nat -I OUTPUT 1 -p tcp -j UAPK_OUTPUT"), "{err}");
}

#[test]
fn exempt_uids_return_in_both_tables_before_the_redirect_and_the_drop() {
    let rules = iptables_rules_exempting(14337, &[1337, 14337], 14001, &[ip("10.96.0.10")]);
    let all = lines(&rules);
    for bin in ["iptables", "ip6tables"] {
        for (table, chain, last) in
            [("", "UAPK_EGRESS", "-j DROP"), ("-t nat ", "UAPK_OUTPUT", "-j REDIRECT --to-ports 14001")]
        {
            let chain_rules: Vec<&String> =
                all.iter().filter(|l| l.starts_with(&format!("{bin} {table}-A {chain} "))).collect();
            let pos = |needle: &str| chain_rules.iter().position(|l| l.contains(needle));
            let end = pos(last).unwrap_or_else(|| panic!("{bin} {chain}: no {last}"));
            for uid in ["14337", "1337"] {
                let p = pos(&format!("--uid-owner {uid} -j RETURN")).unwrap_or_else(|| panic!("{bin} {chain}: {uid}"));
                assert!(p < end, "{bin} {chain}: UID {uid} returns after {last}");
            }
            // The gateway's UID is listed once, though named twice.
            assert_eq!(chain_rules.iter().filter(|l| l.contains("--uid-owner 14337 ")).count(), 1);
        }
    }
    // Without exemptions the rules are those of `iptables_rules`.
    assert_eq!(lines(&iptables_rules_exempting(1337, &[], 15001, &[])), lines(&iptables_rules(1337, 15001, &[])));
}
